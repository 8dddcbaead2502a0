"""Ingest benchmark: staging through the ingest service against a durable plain copy.

    python bench/ingest.py [--large-mib 1024] [--small-files 10000] [--small-kib 10]

In one run, on one file system: a large .npz (one array) and a folder of small .npz files are
(1) copied with ``cp`` / ``cp -r`` followed by ``sync -f`` of the destination (the durable copy
floor), (2) hashed with ``sha256sum`` alone, and (3) staged through a running ingest service
(HTTP POST of the source path; it copies, hashes, validates, syncs and publishes the version,
records it in KV and publishes dataset.staged). Throughput is source bytes / seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
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


def size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def timed(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def durable_copy(source: Path, scratch: Path) -> float:
    target = scratch / f"copy-{source.name}"
    seconds = timed(["cp", "-r", str(source), str(target)]) + timed(["sync", "-f", str(target)])
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    subprocess.run(["sync"], check=True)
    return seconds


def hash_only(source: Path) -> float:
    if source.is_file():
        return timed(["sha256sum", str(source)])
    return timed(["find", str(source), "-type", "f", "-exec", "sha256sum", "{}", "+"])


async def stage(port: int, name: str, source: Path) -> float:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as http:
        started = time.perf_counter()
        async with http.post(
            f"http://127.0.0.1:{port}/v1/datasets", json={"name": name, "source": str(source)}
        ) as response:
            body = await response.json()
            seconds = time.perf_counter() - started
            if response.status != 201:
                raise RuntimeError(f"staging failed: {response.status} {body}")
    return seconds


def start_ingest(
    nats_url: str, storage: Path, sources: Path, log: Path
) -> tuple[subprocess.Popen[bytes], int]:
    env = {
        **os.environ,
        "TORCHRELAY_STORAGE_ROOT": str(storage),
        "TORCHRELAY_INGEST_ALLOWED_ROOTS": str(sources),
        "TORCHRELAY_INGEST_MAX_BYTES": str(64 << 30),
        "TORCHRELAY_INGEST_MAX_FILE_BYTES": str(64 << 30),
    }
    handle = log.open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torchrelay",
            "service",
            "ingest",
            "--nats-url",
            nats_url,
            "--http-port",
            "0",
        ],
        stdout=handle,
        stderr=subprocess.STDOUT,
        env=env,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if '"service.ready"' in line:
                return process, int(json.loads(line)["http_port"])
        if process.poll() is not None:
            raise RuntimeError(log.read_text())
        time.sleep(0.1)
    raise RuntimeError("ingest did not start")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--large-mib", type=int, default=1024)
    parser.add_argument("--small-files", type=int, default=10_000)
    parser.add_argument("--small-kib", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-", dir=os.environ.get("BENCH_DIR")))
    sources, storage = work / "sources", work / "storage"
    sources.mkdir()
    try:
        make_large(sources / "large.npz", args.large_mib)
        make_small(sources / "small", args.small_files, args.small_kib)
        subprocess.run(["sync"], check=True)  # nothing dirty left over for the timed syncs
        results: dict[str, dict[str, float]] = {}
        with NatsServer(work / "nats") as server:
            process, port = start_ingest(server.url, storage, sources, work / "ingest.log")
            try:
                for case, source in (
                    ("large", sources / "large.npz"),
                    ("small", sources / "small"),
                ):
                    size = size_of(source)
                    copy_s = durable_copy(source, work)
                    hash_s = hash_only(source)
                    stage_s = await stage(port, f"bench-{case}", source)
                    subprocess.run(["sync"], check=True)
                    results[case] = {
                        "bytes": size,
                        "durable_copy_mb_s": size / copy_s / 1e6,
                        "sha256sum_mb_s": size / hash_s / 1e6,
                        "torchrelay_mb_s": size / stage_s / 1e6,
                        "ratio_vs_durable_copy": copy_s / stage_s,
                        "ratio_vs_floor": max(copy_s, hash_s) / stage_s,
                    }
            finally:
                process.terminate()
                process.wait(30)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for case, row in results.items():
        print(
            f"{case:5s} {row['bytes'] / 1e6:8.1f} MB"
            f"  cp+sync {row['durable_copy_mb_s']:7.1f} MB/s"
            f"  sha256sum {row['sha256sum_mb_s']:7.1f} MB/s"
            f"  torchrelay {row['torchrelay_mb_s']:7.1f} MB/s"
            f"  = {row['ratio_vs_durable_copy']:.2f}x durable copy,"
            f" {row['ratio_vs_floor']:.2f}x floor"
        )
    print("targets: large >= 0.70x durable copy; small >= 0.50x durable cp -r")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
