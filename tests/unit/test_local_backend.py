"""The local backend's ownership rule: its jobs are child processes of the replica that
started them, so it cancels only those and says so for any other handle."""

from __future__ import annotations

import pytest

from torchrelay.shared.cluster.local import LocalBackend
from torchrelay.shared.cluster.port import WorkerJob
from torchrelay.shared.cluster.worker_spec import WORKER_ENV, WorkerSpec
from torchrelay.shared.errors import JobNotFound, NotOwned, TransientError
from torchrelay.shared.events.data import TrainJobSpec


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


def test_every_rank_gets_the_rendezvous_and_collective_timeouts_of_its_job() -> None:
    job = TrainJobSpec.model_validate(
        {
            "entrypoint": "torchrelay.services.train.examples.digits:train",
            "model_name": "digits",
            "world_size": 2,
            "dataset": {"name": "digits", "version": "v1"},
        }
    )
    work = WorkerJob(
        run_id="r1",
        attempt=0,
        job=job,
        dataset_path="datasets/digits/v1",
        storage_root="/storage",
        rendezvous_timeout_s=900,
        collective_timeout_s=60,
    )
    request = LocalBackend(max_world_size=2).dryrun(work)
    specs = [WorkerSpec.model_validate_json(rank.env[WORKER_ENV]) for rank in request.ranks]
    assert [(s.rank, s.rendezvous_timeout_s, s.collective_timeout_s) for s in specs] == [
        (0, 900, 60),
        (1, 900, 60),
    ]
