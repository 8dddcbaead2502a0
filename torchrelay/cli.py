"""The ``torchrelay`` command."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from torchrelay import __version__

# Services import lazily: `torchrelay service monitor` never imports torch.
SERVICES = {
    "ingest": "torchrelay.services.ingest.service",
    "monitor": "torchrelay.services.monitor.service",
    "serve": "torchrelay.services.serve.service",
    "train": "torchrelay.services.train.service",
}
PLANNED: dict[str, int] = {}
EXIT_USAGE = 2


def _schema_export(directory: Path) -> int:
    from torchrelay.shared.events.schema import (
        all_json_schemas,
        asyncapi_document,
        schema_file_name,
    )

    directory.mkdir(parents=True, exist_ok=True)
    schemas = all_json_schemas()
    for event_type, schema in schemas.items():
        (directory / schema_file_name(event_type)).write_text(json.dumps(schema, indent=2) + "\n")
    (directory / "asyncapi.json").write_text(json.dumps(asyncapi_document(), indent=2) + "\n")
    print(f"wrote {len(schemas)} event schemas and asyncapi.json to {directory}")
    return 0


def _service(name: str, argv: Sequence[str]) -> int:
    if name in PLANNED:
        print(
            f"torchrelay: the {name} service is not implemented yet (issue #{PLANNED[name]}); "
            f"available: {', '.join(sorted(SERVICES))}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    module = importlib.import_module(SERVICES[name])
    result: int = module.main(list(argv))
    return result


def _demo() -> int:
    print(
        "torchrelay demo: the digits pipeline (stage sklearn:digits, train with world size 2, "
        "deploy) arrives with the local platform issue (#7).\n"
        "Available now: `torchrelay service ingest|train|serve|monitor` and "
        "`torchrelay schema export DIR`."
    )
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchrelay", description=__doc__)
    parser.add_argument("--version", action="version", version=f"torchrelay {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    service = commands.add_parser("service", help="run one service", add_help=False)
    service.add_argument("name", choices=sorted({*SERVICES, *PLANNED}))

    schema = commands.add_parser("schema", help="event schemas")
    schema_commands = schema.add_subparsers(dest="schema_command", required=True)
    export = schema_commands.add_parser(
        "export", help="write a JSON Schema per event type and an AsyncAPI 3 document"
    )
    export.add_argument("directory", type=Path)
    schema_commands.add_parser("catalogue", help="print the event catalogue as Markdown")

    commands.add_parser("demo", help="run the digits demo pipeline")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    if args.command == "service":
        return _service(args.name, rest)
    if rest:
        build_parser().error(f"unrecognised arguments: {' '.join(rest)}")
    if args.command == "schema" and args.schema_command == "catalogue":
        from torchrelay.shared.events.schema import catalogue_markdown

        print(catalogue_markdown(), end="")
        return 0
    if args.command == "schema":
        return _schema_export(args.directory)
    return _demo()
