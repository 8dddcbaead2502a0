"""A rank joins its attempt's process group within the rendezvous timeout its spec gives it,
not torch's one timeout for everything: a rank whose peers never come fails with why, and
leaves no group behind."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist

from torchrelay.services.train.worker.group import RendezvousTimeout, join
from torchrelay.shared.cluster.worker_spec import WORKER_ENV, WorkerSpec
from torchrelay.shared.events.data import TrainJobSpec

pytestmark = pytest.mark.timeout(60)


def spec(rendezvous: str, **fields: object) -> WorkerSpec:
    job = TrainJobSpec.model_validate(
        {
            "entrypoint": "torchrelay.services.train.examples.digits:train",
            "model_name": "digits",
            "world_size": 2,
            "dataset": {"name": "digits", "version": "v1"},
        }
    )
    values: dict[str, object] = {
        "run_id": "r1",
        "attempt": 0,
        "rank": 0,
        "world_size": 2,
        "rendezvous": rendezvous,
        "backend": "gloo",
        "job": job,
        "storage_root": "/storage",
        "dataset_path": "datasets/digits/v1",
        **fields,
    }
    return WorkerSpec.model_validate(values)


def test_a_rank_whose_peers_never_come_fails_after_the_rendezvous_timeout(
    tmp_path: Path,
) -> None:
    # The collective timeout is far longer: torch alone would wait that long for the peer.
    lonely = spec(f"file://{tmp_path / 'store'}", rendezvous_timeout_s=1, collective_timeout_s=3600)
    with pytest.raises(RendezvousTimeout) as caught:
        join(lonely)
    message = str(caught.value)
    assert message.startswith(
        f"rank 0: not every one of the 2 ranks joined the rendezvous at file://{tmp_path}/store "
        "within 1s (TORCHRELAY_TRAIN_RENDEZVOUS_TIMEOUT_S)"
    )
    assert not dist.is_initialized(), "no half-made group is left"


def test_a_rank_reads_both_timeouts_from_its_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    given = spec("tcp://job-0.job.torchrelay.svc:29500", rendezvous_timeout_s=900)
    monkeypatch.setenv(WORKER_ENV, given.model_dump_json())
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    read = WorkerSpec.from_env()
    assert (read.rank, read.rendezvous_timeout_s, read.collective_timeout_s) == (1, 900, 1800)
