"""Process entry point shared by every service: flags + environment -> settings -> run."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import Any

import structlog
from pydantic import ValidationError

from torchrelay.shared.errors import ConfigError
from torchrelay.shared.runtime.logging import configure_logging
from torchrelay.shared.runtime.service import S, ServiceFactory, run_service

EXIT_BAD_SETTINGS = 2


def _parser(name: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"torchrelay service {name}",
        description=f"Run the {name} service. Flags override TORCHRELAY_* environment variables.",
    )
    parser.add_argument("--nats-url", help="NATS server URL(s) (TORCHRELAY_NATS_URL)")
    parser.add_argument("--storage-root", help="shared storage root (TORCHRELAY_STORAGE_ROOT)")
    parser.add_argument("--http-host", help="HTTP bind address (TORCHRELAY_HTTP_HOST)")
    parser.add_argument("--http-port", type=int, help="HTTP port, 0 = any (TORCHRELAY_HTTP_PORT)")
    parser.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="TORCHRELAY_LOG_LEVEL"
    )
    parser.add_argument("--log-format", choices=["json", "console"], help="TORCHRELAY_LOG_FORMAT")
    return parser


def overrides_from_flags(args: argparse.Namespace) -> dict[str, Any]:
    """Turn the flags that were given into nested settings overrides."""
    flat = {
        ("nats", "url"): args.nats_url,
        ("storage_root",): args.storage_root,
        ("http", "host"): args.http_host,
        ("http", "port"): args.http_port,
        ("log", "level"): args.log_level,
        ("log", "format"): args.log_format,
    }
    nested: dict[str, Any] = {}
    for path, value in flat.items():
        if value is None:
            continue
        target = nested
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = value
    return nested


def describe_settings_error(exc: ValidationError) -> str:
    lines = ["invalid settings:"]
    for err in exc.errors(include_url=False):
        field = "_".join(str(p) for p in err["loc"]).upper()
        lines.append(f"  TORCHRELAY_{field}: {err['msg']}")
    return "\n".join(lines)


def service_main(
    name: str,
    settings_type: type[S],
    factory: ServiceFactory[S],
    argv: Sequence[str] | None = None,
) -> int:
    """Parse flags, load settings (bad settings: list the fields, exit 2), configure logging
    once, and run the service until SIGTERM."""
    args = _parser(name).parse_args(argv)
    try:
        settings = settings_type(**overrides_from_flags(args))
    except ValidationError as exc:
        print(describe_settings_error(exc), file=sys.stderr)  # noqa: T201 - before logging exists
        return EXIT_BAD_SETTINGS
    configure_logging(settings.log)
    try:
        asyncio.run(run_service(name, settings, factory))
    except ConfigError as exc:
        structlog.get_logger("torchrelay.runtime").error("service.config_error", error=str(exc))
        return EXIT_BAD_SETTINGS
    return 0
