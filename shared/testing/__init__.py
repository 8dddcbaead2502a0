"""Test helpers for torchrelay and for users' own tests of handlers and services.

``torchrelay.shared.testing.fixtures`` is a pytest plugin (real nats-server per module, clean
JetStream per test, leak checks); :func:`assert_eventually` replaces sleeps.
"""

from torchrelay.shared.testing.eventually import assert_eventually

__all__ = ["assert_eventually"]
