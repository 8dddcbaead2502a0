"""Finding the platform: `torchrelay up --detach` returns once every service is ready, any
command finds it from any folder through its state folder, `torchrelay down` stops it and
leaves nothing running; NATS listens on 4222 unless that port is taken, and `up` says so."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from tests.e2e.conftest import ROOT, start_up, torchrelay
from torchrelay.platform import NATS_PORT
from torchrelay.shared.testing import assert_eventually


def run(
    *argv: str, cwd: Path, env: Mapping[str, str], timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """The command as a user types it, with exactly this environment (and our sources)."""
    return subprocess.run(
        [sys.executable, "-m", "torchrelay", *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**env, "PYTHONPATH": str(ROOT)},
    )


def user_env(home: Path, **variables: str) -> dict[str, str]:
    """A user's environment with ``home`` as their home and no state folder chosen, plus
    ``variables``."""
    inherited = {
        k: v
        for k, v in os.environ.items()
        if k not in ("TORCHRELAY_STATE_DIR", "XDG_STATE_HOME", "TORCHRELAY_NATS_URL")
    }
    return {**inherited, "HOME": str(home), **variables}


def gone(pid: int) -> bool:
    """The process has ended (a zombie waiting for its parent to reap it has ended too)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.stdout == "", result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def port_4222_taken() -> Iterator[None]:
    """Something else listens on NATS's well-known port (else something already does)."""
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        holder.bind(("127.0.0.1", NATS_PORT))
        holder.listen()
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
    try:
        yield
    finally:
        holder.close()


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_up_detach_returns_when_ready_and_down_stops_everything_from_any_folder(
    tmp_path: Path,
) -> None:
    state, here, elsewhere = tmp_path / "state", tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    env = user_env(tmp_path / "home", TORCHRELAY_STATE_DIR=str(state))

    up = run("up", "--detach", cwd=here, env=env)
    assert up.returncode == 0, up.stdout + up.stderr
    described = json.loads((state / "platform.json").read_text())
    assert described["state_dir"] == str(state.resolve()), "the state folder from the variable"
    assert not (here / ".torchrelay").exists(), "nothing in the current folder"
    assert not (tmp_path / "home" / ".local" / "state").exists(), "nor in the per-user one"
    assert up.stdout.startswith(f"NATS        {described['nats_url']}")
    for name, service in described["services"].items():
        log = state.resolve() / "logs" / f"{name}.log"
        assert f"{name:11s} {service['url']}   (log: {log})" in up.stdout
    assert "ready in " in up.stdout
    assert "`torchrelay down` stops it" in up.stdout
    supervisor = int(described["pid"])
    assert not gone(supervisor), "the supervisor outlives `up --detach`"
    assert "ready in " in (state / "logs" / "up.log").read_text(), "its output goes to its log"

    shown = run("status", "--json", cwd=elsewhere, env=env)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert set(json.loads(shown.stdout)) >= {"pipelines", "deployments"}
    exported = run("env", cwd=elsewhere, env=env)
    assert f"export TORCHRELAY_STATE_DIR={state}" in exported.stdout.splitlines()
    again = run("up", "--detach", cwd=elsewhere, env=env)
    assert again.returncode == 2
    assert one_line_error(again) == f"torchrelay: a platform already runs from {state}"

    down = run("down", cwd=elsewhere, env=env)
    assert down.returncode == 0, down.stdout + down.stderr
    assert down.stdout == f"stopped the platform that ran from {state}\n"
    assert not (state / "platform.json").exists()
    started = [int(s["pid"]) for s in described["services"].values()] + [described["nats_pid"]]
    assert [pid for pid in started if not gone(pid)] == [], "every service and nats-server"
    await assert_eventually(lambda: gone(supervisor), timeout_s=30, message="the supervisor")

    nothing = run("down", cwd=elsewhere, env=env)
    assert nothing.returncode == 1
    assert one_line_error(nothing) == f"torchrelay: no platform runs from {state}"


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.usefixtures("port_4222_taken")
def test_with_port_4222_taken_up_takes_a_free_port_and_says_so(tmp_path: Path) -> None:
    platform = start_up(tmp_path)  # in the foreground, as before; `down` stops it too
    try:
        nats_url = platform.described["nats_url"]
        assert not nats_url.endswith(f":{NATS_PORT}")
        port = nats_url.rsplit(":", 1)[1]
        exported = torchrelay("env", cwd=tmp_path).stdout
        assert f"@127.0.0.1:{port}" in exported, "clients find it through `torchrelay env`"
    finally:
        down = torchrelay("down", cwd=tmp_path)
        output, _ = platform.process.communicate(timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    assert platform.process.returncode == 0, output
    assert f"port {NATS_PORT} was taken (another NATS?), so this NATS listens on {port}" in output
    assert "ready in " in output
    assert "stopping..." in output


def test_down_with_nothing_running_says_so_in_one_line(tmp_path: Path) -> None:
    home = tmp_path / "home"
    result = run("down", cwd=tmp_path, env=user_env(home))
    assert result.returncode == 1
    default = home / ".local" / "state" / "torchrelay"
    assert one_line_error(result) == f"torchrelay: no platform runs from {default}"
    assert not home.exists(), "stopping nothing makes no folder"


def test_down_ignores_the_description_a_dead_platform_left(tmp_path: Path) -> None:
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                           capture_output=True, text=True)  # fmt: skip
    (tmp_path / "platform.json").write_text(json.dumps({"pid": int(ended.stdout)}))
    result = run("down", "--state-dir", str(tmp_path), cwd=tmp_path, env=user_env(tmp_path))
    assert result.returncode == 1
    assert one_line_error(result) == f"torchrelay: no platform runs from {tmp_path}"


def test_up_with_no_replicas_is_a_usage_error_and_starts_nothing(tmp_path: Path) -> None:
    env = user_env(tmp_path / "home", XDG_STATE_HOME=str(tmp_path / "xdg"))
    result = run("up", "--detach", "--replicas", "0", cwd=tmp_path, env=env)
    assert result.returncode == 2
    assert "Invalid value for '--replicas'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "xdg" / "torchrelay").exists()


def test_up_detach_that_fails_to_start_says_why_and_leaves_nothing(tmp_path: Path) -> None:
    env = user_env(
        tmp_path / "home", XDG_STATE_HOME=str(tmp_path / "xdg"), TORCHRELAY_RETENTION_S="soon"
    )
    result = run("up", "--detach", cwd=tmp_path, env=env)
    assert result.returncode == 1
    assert result.stdout == ""
    state = tmp_path / "xdg" / "torchrelay"
    assert result.stderr.startswith(
        "torchrelay: `torchrelay up` exited (1) before it was ready; "
        f"the end of {state / 'logs' / 'up.log'}:\n"
    ), result.stderr
    assert "TORCHRELAY_RETENTION_S: Input should be a valid number" in result.stderr
    assert not (state / "platform.json").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_up_detach_whose_services_cannot_start_names_the_one_and_stops_the_rest(
    tmp_path: Path,
) -> None:
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    env = user_env(
        tmp_path / "home",
        TORCHRELAY_STATE_DIR=str(tmp_path / "state"),
        TORCHRELAY_NATS_STARTUP_WAIT_S="1",
    )
    result = run("up", "--detach", "--nats-url", f"nats://127.0.0.1:{port}", cwd=tmp_path, env=env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr.splitlines()[0]
    assert "before it was ready" in result.stderr
    assert "service exited" in result.stderr, result.stderr
    assert "cannot reach NATS" in result.stderr, "the service's own reason, from its log"
    assert not (tmp_path / "state" / "platform.json").exists()
    assert running_services(tmp_path / "state") == [], "the other services were stopped"


def running_services(state: Path) -> list[str]:
    """Service processes that still write into ``state``'s logs (by their open log file)."""
    logs = str(state.resolve() / "logs")
    holding = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            targets = [str(fd.readlink()) for fd in (proc / "fd").iterdir()]
        except OSError:
            continue
        holding += [f"{proc.name}: {t}" for t in targets if t.startswith(logs)]
    return holding
