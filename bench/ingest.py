"""Ingest benchmark: staging through the ingest service against a durable plain copy.

    python bench/ingest.py [--large-mib 1024] [--small-files 10000] [--small-kib 10]
                           [--rounds 4] [--json]

In one run, on one file system, a large .npz (one array) and a folder of small .npz files are
(1) copied with ``cp`` / ``cp -r`` followed by ``sync -f`` of the destination (the durable copy
floor) and (2) staged through a running ingest service (HTTP POST of the source path; it
copies, hashes, validates, syncs and publishes the version, records it in KV and publishes
dataset.staged). The two sides alternate, first one then the other, for ``--rounds`` rounds,
and each side's output is removed (then ``sync``) before the next timed side: ext4 costs
far more kernel time per file created once it has churned than when fresh, so both sides
must see the same state. The ratio is the median of the per-round ratios (copy seconds /
staging seconds), so noise from other work on the machine hits both sides alike.

The hash floor is the hash staging uses (Python's hashlib sha256, in process, over the same
files in the same chunks), not ``sha256sum``, which is several times slower on many CPUs and
would hide the real floor. Peak RSS is the ingest service's (``VmHWM``, reset per case).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import aiohttp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from torchrelay.shared.bus.server import NatsServer
from torchrelay.shared.storage.atomic import COPY_CHUNK_BYTES

TARGETS = {"large": 0.7, "small": 0.5}


def make_large(path: Path, mib: int) -> None:
    """An uncompressed .npz (a zip holding one .npy) of ``mib`` MiB of random bytes, written
    in 1 MiB rows so it never sits in memory whole."""
    npy = path.with_suffix(".npy")
    array = np.lib.format.open_memmap(npy, mode="w+", dtype=np.uint8, shape=(mib, 1 << 20))
    rng = np.random.default_rng(0)
    for row in range(mib):
        array[row] = rng.integers(0, 256, 1 << 20, dtype=np.uint8)
    array.flush()
    del array
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as bundle:
        bundle.write(npy, "x.npy")
    npy.unlink()


def make_small(folder: Path, count: int, kib: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    values = max(1, (kib * 1024 - 200) // 8)
    for index in range(count):
        np.savez(folder / f"part-{index:05d}.npz", x=rng.random(values))


def files_of(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


def sync() -> None:
    subprocess.run(["sync"], check=True)


def remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    sync()  # the next timed side starts with nothing dirty


def durable_copy(source: Path, scratch: Path) -> float:
    """``cp -r`` then ``sync -f`` of the copy: what a user would do by hand."""
    target = scratch / f"copy-{source.name}"
    started = time.perf_counter()
    subprocess.run(["cp", "-r", str(source), str(target)], check=True)
    subprocess.run(["sync", "-f", str(target)], check=True)
    seconds = time.perf_counter() - started
    remove(target)
    return seconds


def hash_seconds(source: Path) -> float:
    """The hash floor: hashlib's sha256 over every file, in process, as staging hashes."""
    buffer = bytearray(COPY_CHUNK_BYTES)
    view = memoryview(buffer)
    started = time.perf_counter()
    for path in files_of(source):
        digest = hashlib.sha256()
        with path.open("rb", buffering=0) as handle:
            while read := handle.readinto(buffer):
                digest.update(view[:read])
        digest.hexdigest()
    return time.perf_counter() - started


async def stage(http: aiohttp.ClientSession, port: int, name: str, source: Path) -> dict[str, str]:
    async with http.post(
        f"http://127.0.0.1:{port}/v1/datasets", json={"name": name, "source": str(source)}
    ) as response:
        body: dict[str, str] = await response.json()
        if response.status != 201:
            raise RuntimeError(f"staging failed: {response.status} {body}")
        return body


async def timed_stage(
    http: aiohttp.ClientSession, port: int, name: str, source: Path, storage: Path
) -> float:
    started = time.perf_counter()
    body = await stage(http, port, name, source)
    seconds = time.perf_counter() - started
    remove(storage / body["path"])  # the next round stages it anew
    return seconds


def reset_peak_rss(pid: int) -> bool:
    """Reset the kernel's peak RSS of ``pid`` (Linux >= 4.0); False where that is refused."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_ingest(
    nats_url: str, storage: Path, sources: Path, log: Path
) -> tuple[subprocess.Popen[bytes], int]:
    env = {
        **os.environ,
        "TORCHRELAY_STORAGE_ROOT": str(storage),
        "TORCHRELAY_INGEST_ALLOWED_ROOTS": str(sources),
        "TORCHRELAY_INGEST_MAX_BYTES": str(64 << 30),
        "TORCHRELAY_INGEST_MAX_FILE_BYTES": str(64 << 30),
        "TORCHRELAY_INGEST_MAX_FILES": str(10_000_000),
    }
    handle = log.open("wb")
    argv = [sys.executable, "-m", "torchrelay", "service", "ingest"]
    argv += ["--nats-url", nats_url, "--http-port", "0"]
    process = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if '"service.ready"' in line:
                return process, int(json.loads(line)["http_port"])
        if process.poll() is not None:
            raise RuntimeError(log.read_text())
        time.sleep(0.1)
    raise RuntimeError("ingest did not start")


async def run_case(
    case: str, source: Path, *, work: Path, storage: Path, port: int, pid: int, rounds: int
) -> dict[str, float]:
    size = sum(p.stat().st_size for p in files_of(source))
    copies: list[float] = []
    stagings: list[float] = []
    resettable = reset_peak_rss(pid)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as http:
        for round_ in range(rounds):
            # Alternate which side goes first, so neither always inherits the other's state.
            if round_ % 2 == 0:
                copies.append(durable_copy(source, work))
                stagings.append(await timed_stage(http, port, f"bench-{case}", source, storage))
            else:
                stagings.append(await timed_stage(http, port, f"bench-{case}", source, storage))
                copies.append(durable_copy(source, work))
            print(
                f"{case} round {round_}: cp+sync {copies[-1]:.2f} s, torchrelay "
                f"{stagings[-1]:.2f} s = {copies[-1] / stagings[-1]:.2f}x",
                file=sys.stderr,
            )
    hashing = statistics.median(hash_seconds(source) for _ in range(rounds))
    copy_s, stage_s = statistics.median(copies), statistics.median(stagings)
    return {
        "bytes": size,
        "files": len(files_of(source)),
        "durable_copy_mb_s": size / copy_s / 1e6,
        "hash_mb_s": size / hashing / 1e6,
        "torchrelay_mb_s": size / stage_s / 1e6,
        "torchrelay_files_s": len(files_of(source)) / stage_s,
        "ratio": statistics.median(c / s for c, s in zip(copies, stagings, strict=True)),
        "ratio_vs_floor": statistics.median(
            max(c, hashing) / s for c, s in zip(copies, stagings, strict=True)
        ),
        "peak_rss_mib": peak_rss_mib(pid) if resettable else float("nan"),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--large-mib", type=int, default=1024)
    parser.add_argument("--small-files", type=int, default=10_000)
    parser.add_argument("--small-kib", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=4, help="even: each side goes first as often")
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-", dir=os.environ.get("BENCH_DIR")))
    sources, storage = work / "sources", work / "storage"
    sources.mkdir()
    results: dict[str, dict[str, float]] = {}
    try:
        make_large(sources / "large.npz", args.large_mib)
        make_small(sources / "small", args.small_files, args.small_kib)
        sync()  # nothing dirty left over for the timed syncs
        with NatsServer(work / "nats") as server:
            process, port = start_ingest(server.url, storage, sources, work / "ingest.log")
            try:
                for case, source in (
                    ("large", sources / "large.npz"),
                    ("small", sources / "small"),
                ):
                    results[case] = await run_case(
                        case,
                        source,
                        work=work,
                        storage=storage,
                        port=port,
                        pid=process.pid,
                        rounds=args.rounds,
                    )
            finally:
                process.terminate()
                process.wait(30)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    figures = {
        f"{case}_{key}": value for case, row in results.items() for key, value in row.items()
    }
    figures["rounds"] = args.rounds
    ratios = {case: row["ratio"] for case, row in results.items()}
    if args.json:
        print(json.dumps({"figures": figures, "ratios": ratios}))
        return
    for case, row in results.items():
        print(
            f"{case:5s} {row['bytes'] / 1e6:8.1f} MB in {row['files']:.0f} files"
            f"  cp+sync {row['durable_copy_mb_s']:7.1f} MB/s"
            f"  hashlib {row['hash_mb_s']:7.1f} MB/s"
            f"  torchrelay {row['torchrelay_mb_s']:7.1f} MB/s"
            f" ({row['torchrelay_files_s']:.0f} files/s)"
            f"  = {row['ratio']:.2f}x durable copy (median of {args.rounds}),"
            f" {row['ratio_vs_floor']:.2f}x floor; peak RSS {row['peak_rss_mib']:.0f} MiB"
        )
    print("targets: large >= 0.70x durable copy; small >= 0.50x durable cp -r")


if __name__ == "__main__":
    asyncio.run(main())
