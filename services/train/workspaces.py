"""Entrypoints from a staged workspace: the user's own code, checked where the ranks import it.

A workspace is a folder ingest staged on the shared storage (``workspaces/<id>/code``); every
rank puts it first on its import path. The platform staged it for the run, so the entrypoint
policy's module prefixes do not apply to it; instead the entrypoint's module must be a file of
the workspace (found on disk, never imported here), must not take the name of a module the
worker imports from its own environment, and must define the function (its source is parsed).
"""

from __future__ import annotations

import ast
import difflib
import sys
from pathlib import Path

from torchrelay.services.train.domain import entrypoint_refusal
from torchrelay.shared.errors import UnsafePath
from torchrelay.shared.storage import resolve_within
from torchrelay.shared.storage.layout import Layout

RESERVED = frozenset({"torchrelay", "torch", "numpy"})
"""Top-level names a workspace may not take besides the standard library's: what the worker
itself imports before the user's code (a workspace's ``torch.py`` would shadow nothing, or
everything)."""


def module_file(code: Path, module: str) -> Path | None:
    """The file of dotted ``module`` inside ``code`` (``a/b.py`` or ``a/b/__init__.py``), as
    Python's path finder would find it from ``code``; None when the workspace has none. A
    path that leaves ``code`` (a link) counts as none."""
    *packages, last = module.split(".")
    folder = code.joinpath(*packages)
    for candidate in (folder / f"{last}.py", folder / last / "__init__.py"):
        if candidate.is_file():
            try:
                return resolve_within(code, candidate.relative_to(code).as_posix())
            except UnsafePath:
                return None
    return None


def shadowing_refusal(module: str) -> str | None:
    """Why a workspace module may not be named ``module`` (it would shadow what the worker
    needs), or None."""
    top = module.partition(".")[0]
    if top in sys.stdlib_module_names or top in RESERVED:
        return (
            f"the workspace's module {module!r} takes the name of {top!r}, which the worker "
            "imports from its own environment; rename the workspace's package"
        )
    return None


def did_you_mean(source: str, function: str) -> str:
    """`` (did you mean 'train'?)`` when ``source`` defines a top-level function whose name is
    close to ``function``, else an empty string."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    names = [
        node.name for node in tree.body if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    ]
    close = difflib.get_close_matches(function, names, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def workspace_refusal(layout: Layout, workspace: str, entrypoint: str) -> str | None:
    """Why ``entrypoint`` cannot run from staged ``workspace``, or None when it can."""
    if not layout.workspace_manifest(workspace).is_file():
        return (
            f"unknown workspace {workspace}: stage it first (`torchrelay submit` stages the "
            "folder a spec's `workspace:` names; other systems POST it to ingest's /v1/workspaces)"
        )
    module, _, function = entrypoint.partition(":")
    refusal = shadowing_refusal(module)
    if refusal is not None:
        return refusal
    code = layout.workspace_code(workspace)
    found = module_file(code, module)
    if found is None:
        shown = sorted(p.relative_to(code).as_posix() for p in code.rglob("*.py"))[:10]
        return (
            f"entrypoint {entrypoint!r}: workspace {workspace} has no module {module!r} "
            f"(its Python files: {', '.join(shown) or 'none'})"
        )
    try:
        source = found.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return f"entrypoint {entrypoint!r}: cannot read {found} ({exc})"
    refusal = entrypoint_refusal(entrypoint, (module,), source)
    if refusal is not None:
        return refusal + did_you_mean(source, function)
    return None
