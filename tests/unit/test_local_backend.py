"""The local backend's ownership rule: its jobs are child processes of the replica that
started them, so it cancels only those and says so for any other handle."""

from __future__ import annotations

import pytest

from torchrelay.shared.cluster.local import LocalBackend
from torchrelay.shared.errors import JobNotFound, NotOwned, TransientError


async def test_cancel_refuses_a_handle_it_did_not_start() -> None:
    backend = LocalBackend(max_world_size=2)
    with pytest.raises(NotOwned, match=r"no local job 'run-1/0' runs in this replica") as refused:
        await backend.cancel("run-1/0")
    assert isinstance(refused.value, JobNotFound)
    assert not isinstance(refused.value, TransientError), "retrying is the caller's decision"
    assert isinstance(refused.value.__cause__, KeyError)
    await backend.aclose()


async def test_aclose_with_nothing_running_is_quiet() -> None:
    backend = LocalBackend(max_world_size=2)
    await backend.aclose()
    await backend.aclose()
