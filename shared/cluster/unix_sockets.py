"""Unix socket addresses of any length: shared by the local serving backend and the model
server, which imports this alone (not the backend's module, whose imports would slow every
server's start)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

SUN_PATH_MAX = 107
"""Bytes a unix socket's path may have (``sun_path`` is 108 on Linux, with its NUL)."""


@contextlib.contextmanager
def socket_address(path: Path) -> Iterator[str]:
    """An address that reaches the unix socket at ``path``, to bind or connect while open.

    A path longer than :data:`SUN_PATH_MAX` (a deep storage root) cannot be a socket's address;
    then the same file is named through an open descriptor of its folder,
    ``/proc/self/fd/<n>/<name>``, which Linux resolves like the long path.
    """
    if len(os.fsencode(path)) <= SUN_PATH_MAX:
        yield str(path)
        return
    if not sys.platform.startswith("linux"):
        raise OSError(
            f"the unix socket path {path} is longer than {SUN_PATH_MAX} bytes; "
            "use a shorter storage root"
        )
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{folder}/{path.name}"
    finally:
        os.close(folder)
