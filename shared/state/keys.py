"""Key rules shared by every state adapter: what NATS KV accepts, and how to escape the rest."""

from __future__ import annotations

import math
import re

from torchrelay.shared.errors import PermanentError

_KEY = re.compile(r"[-/_=.A-Za-z0-9]+")
MIN_TTL_S = 1.0


class InvalidKey(PermanentError, ValueError):
    """A key NATS KV would refuse (build keys from outside input with :func:`key_part`)."""


def check_key(key: str) -> str:
    """``key`` if NATS KV accepts it: ``[-/_=.A-Za-z0-9]`` only, and ``.``-separated tokens
    none of which is empty (the key is a subject token sequence); :class:`InvalidKey` if not."""
    if not _KEY.fullmatch(key) or "" in key.split("."):
        raise InvalidKey(
            f"invalid state key {key!r}: use [-/_=.A-Za-z0-9] with no empty '.'-separated "
            "part; escape outside text with key_part()"
        )
    return key


def check_ttl(ttl_s: float | None) -> float | None:
    """``ttl_s`` if it is a usable per-message TTL: NATS counts them in whole seconds from 1."""
    if ttl_s is not None and not (math.isfinite(ttl_s) and ttl_s >= MIN_TTL_S):
        raise ValueError(f"ttl_s must be at least {MIN_TTL_S} s (or None to keep), got {ttl_s}")
    return ttl_s


def key_part(text: str) -> str:
    """Make ``text`` safe inside a KV key (NATS allows ``[-/_=.A-Za-z0-9]``): other characters
    become ``=XX`` hex escapes, and ``.`` too, since it separates key parts."""
    safe = []
    for char in text:
        if char.isascii() and (char.isalnum() or char in "-_"):
            safe.append(char)
        else:
            safe.extend(f"={byte:02X}" for byte in char.encode())
    return "".join(safe)
