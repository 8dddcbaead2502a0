"""Finding the local platform: its state folder (the same from any folder) and what `up` says
about where NATS listens."""

from __future__ import annotations

from pathlib import Path

from torchrelay.platform import NATS_PORT, nats_note, resolve_state_dir, summary

HOME = Path("/home/ada")


def test_the_state_dir_flag_wins_over_everything() -> None:
    environ = {"TORCHRELAY_STATE_DIR": "/srv/relay", "XDG_STATE_HOME": "/var/state"}
    assert resolve_state_dir(Path("mine"), environ=environ, home=HOME) == Path("mine")


def test_then_the_environment_variable() -> None:
    environ = {"TORCHRELAY_STATE_DIR": "/srv/relay", "XDG_STATE_HOME": "/var/state"}
    assert resolve_state_dir(None, environ=environ, home=HOME) == Path("/srv/relay")


def test_then_the_users_xdg_state_home() -> None:
    environ = {"XDG_STATE_HOME": "/var/state/ada"}
    assert resolve_state_dir(None, environ=environ, home=HOME) == Path("/var/state/ada/torchrelay")


def test_else_the_per_user_default_never_the_current_folder() -> None:
    expected = HOME / ".local" / "state" / "torchrelay"
    assert resolve_state_dir(None, environ={}, home=HOME) == expected
    # Empty variables are unset ones; a relative XDG_STATE_HOME is invalid (the XDG spec).
    environ = {"TORCHRELAY_STATE_DIR": "", "XDG_STATE_HOME": "relative/state"}
    assert resolve_state_dir(None, environ=environ, home=HOME) == expected


def test_nats_on_its_well_known_port_needs_no_word() -> None:
    assert nats_note(NATS_PORT) is None


def test_nats_on_another_port_says_which_and_why() -> None:
    note = nats_note(38211)
    assert note is not None
    assert f"port {NATS_PORT} was taken" in note
    assert "listens on 38211" in note
    assert "torchrelay env" in note, "how clients find it"


def test_the_summary_names_nats_each_service_with_its_log_the_storage_and_the_state() -> None:
    described = {
        "pid": 10,
        "nats_url": "nats://127.0.0.1:38211",
        "nats_note": nats_note(38211),
        "state_dir": "/srv/relay",
        "storage_root": "/srv/relay/storage",
        "services": {
            "ingest-0": {"url": "http://127.0.0.1:4001", "pid": 11},
            "train-0": {"url": "http://127.0.0.1:4002", "pid": 12},
        },
    }
    lines = summary(described)
    assert lines[0].startswith("NATS        nats://127.0.0.1:38211")
    assert f"port {NATS_PORT} was taken" in lines[1]
    assert lines[2] == "ingest-0    http://127.0.0.1:4001   (log: /srv/relay/logs/ingest-0.log)"
    assert lines[3] == "train-0     http://127.0.0.1:4002   (log: /srv/relay/logs/train-0.log)"
    assert lines[4:] == ["storage     /srv/relay/storage", "state       /srv/relay"]


def test_the_summary_of_a_platform_on_port_4222_has_no_note() -> None:
    described = {
        "nats_url": f"nats://127.0.0.1:{NATS_PORT}",
        "nats_note": None,
        "state_dir": "/srv/relay",
        "storage_root": "/srv/relay/storage",
        "services": {},
    }
    assert summary(described) == [
        f"NATS        nats://127.0.0.1:{NATS_PORT}   (credentials: `torchrelay env`)",
        "storage     /srv/relay/storage",
        "state       /srv/relay",
    ]
