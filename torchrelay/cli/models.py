"""Models and what serves them: ``models``, ``deploy``, ``rollback``, ``undeploy``,
``predict``; and the staged ``datasets``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from torchrelay.cli.base import (
    EXIT_USAGE,
    Json,
    NatsUrl,
    Refusal,
    StateDir,
    connected,
    run,
    say,
    show_rows,
    state_dir,
)

Model = Annotated[str, typer.Argument(help="The model's name.", show_default=False)]


def models(*, json_out: Json = False, state: StateDir = None, nats_url: NatsUrl = None) -> int:
    """List the trained model versions: which one serves, their metrics and lineage."""

    async def go() -> list[dict[str, object]]:
        async with connected(state_dir(state), nats_url) as client:
            return (await client.inventory()).rows()["models"]

    show_rows(run(go()), json_out)
    return 0


def datasets(*, json_out: Json = False, state: StateDir = None, nats_url: NatsUrl = None) -> int:
    """List the staged dataset versions, oldest first."""

    async def go() -> list[dict[str, object]]:
        async with connected(state_dir(state), nats_url) as client:
            return [
                {
                    "dataset": v.name,
                    "version": v.version,
                    "format": v.format,
                    "files": v.files,
                    "bytes": v.size_bytes,
                    "created": v.created.isoformat(timespec="seconds"),
                    "source": v.source,
                }
                for v in await client.datasets()
            ]

    show_rows(run(go()), json_out)
    return 0


def deploy(
    model: Model,
    version: Annotated[str, typer.Argument(help="A version a run exported.", show_default=False)],
    *,
    replicas: Annotated[int, typer.Option("--replicas", min=1, max=64, help="1 to 64.")] = 1,
    state: StateDir = None,
    nats_url: NatsUrl = None,
) -> int:
    """Roll a trained model version out."""

    async def go() -> None:
        async with connected(state_dir(state), nats_url) as client:
            await client.deploy(model, version, replicas)

    run(go())
    say(f"rollout of {model} {version} requested; `torchrelay status` shows the deployment")
    return 0


def rollback(
    model: Model,
    *,
    to: Annotated[
        str | None,
        typer.Option(
            "--to", help="The version to go to (default: the previous one).", show_default=False
        ),
    ] = None,
    state: StateDir = None,
    nats_url: NatsUrl = None,
) -> int:
    """Put a deployed model's previous version (or --to VERSION) back."""

    async def go() -> None:
        async with connected(state_dir(state), nats_url) as client:
            await client.rollback(model, to)

    run(go())
    say(f"rollback of {model} requested; `torchrelay status` shows it")
    return 0


def undeploy(
    model: Model,
    *,
    reason: Annotated[str, typer.Option("--reason")] = "undeployed from the command line",
    state: StateDir = None,
    nats_url: NatsUrl = None,
) -> int:
    """Take a deployed model's endpoint down (`deploy` brings a version back)."""

    async def go() -> str:
        async with connected(state_dir(state), nats_url) as client:
            return await client.undeploy(model, reason)

    version = run(go())
    say(f"undeploy of {model} ({version} serves) requested; `torchrelay status` shows it")
    return 0


def predict(
    model: Model,
    file: Annotated[Path, typer.Argument(help="One input: .npy, or a .json list of numbers.")],
    *,
    batched: Annotated[
        bool, typer.Option("--batched", help="The file holds a batch (first axis), not one.")
    ] = False,
    raw: Annotated[
        bool,
        typer.Option("--raw", help="Send the input as it is: skip the scaling the model declares."),
    ] = False,
    json_out: Annotated[
        bool,
        typer.Option(
            "--json", help="Print the whole answer (plus the decoded labels when there are)."
        ),
    ] = False,
    state: StateDir = None,
    nats_url: NatsUrl = None,
) -> int:
    """Send an input to a deployed model: its predicted labels when the model declares them."""
    from torchrelay.client import (
        InputMismatch,
        decode,
        infer,
        load_input,
        model_info,
        prepare_input,
        scaling_line,
    )

    try:
        sample = load_input(file)
    except ValueError as exc:
        raise Refusal(str(exc), EXIT_USAGE) from None

    async def go() -> int:
        async with connected(state_dir(state), nats_url) as client:
            deployment = await client.deployment(model)
        if deployment is None or deployment.status != "deployed" or not deployment.endpoint:
            raise Refusal(f"model {model!r} is not deployed")
        try:
            info = await model_info(deployment.endpoint)
            batch = prepare_input(sample, info, batched=batched, raw=raw)
            answer = await infer(deployment.endpoint, info, batch)
        except InputMismatch as exc:
            raise Refusal(str(exc), EXIT_USAGE) from None
        except (RuntimeError, ValueError, OSError) as exc:
            raise Refusal(str(exc)) from None
        decoded = decode(answer, info.labels) if info.labels else None
        if decoded is None:  # nothing to name: the answer as the model gave it
            say(json.dumps(answer, indent=2))
        elif json_out:
            say(json.dumps({**answer, **decoded.as_json()}, indent=2))
        else:
            if info.preprocessing is not None and not raw:
                say(scaling_line(info.preprocessing))
            say("\n".join(decoded.lines()))
        return 0

    return run(go())
