"""The side server's contract: JSON errors everywhere, bearer tokens, open probes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from torchrelay.shared.runtime.http import build_app
from torchrelay.shared.runtime.settings import HttpSettings


async def boom(_: web.Request) -> web.Response:
    raise RuntimeError("a bug")


@pytest.fixture
async def client() -> AsyncIterator[TestClient[web.Request, web.Application]]:
    async def ready() -> bool:
        return False

    app = build_app(
        HttpSettings(bearer_token=SecretStr("t0ken")),
        registry=CollectorRegistry(),
        ready=ready,
        routes=[web.get("/boom", boom)],
    )
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


async def test_a_crash_is_a_json_500_without_details(
    client: TestClient[web.Request, web.Application],
) -> None:
    response = await client.get("/boom", headers={"Authorization": "Bearer t0ken"})
    assert response.status == 500
    body = await response.json()
    assert "a bug" not in body["error"]


async def test_unknown_routes_answer_json(client: TestClient[web.Request, web.Application]) -> None:
    response = await client.get("/nowhere", headers={"Authorization": "Bearer t0ken"})
    assert response.status == 404
    assert (await response.json())["error"] == "Not Found"


async def test_probes_are_open_and_the_rest_needs_the_token(
    client: TestClient[web.Request, web.Application],
) -> None:
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 503
    assert (await client.get("/metrics")).status == 401
    assert (await client.get("/metrics", headers={"Authorization": "Bearer wrong"})).status == 401
    assert (await client.get("/metrics", headers={"Authorization": "Bearer t0ken"})).status == 200
