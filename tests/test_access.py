"""API_KEY and ADMIN_TOKEN, as TEI's --api-key: 401 with an empty body, public health."""

from __future__ import annotations

from tests.conftest import ProxyFactory


async def test_api_key_guards_data_routes(start_proxy: ProxyFactory) -> None:
    client = await start_proxy(api_key="s3cret")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
        resp = await client.post("/embed", json={"inputs": "x"}, headers=headers)
        assert resp.status == 401
        assert await resp.read() == b""
        assert (await client.get("/info", headers=headers)).status == 401
    ok = await client.post(
        "/embed", json={"inputs": "x"}, headers={"Authorization": "Bearer s3cret"}
    )
    assert ok.status == 200
    for path in ("/health", "/ping", "/", "/metrics", "/openapi.json"):
        assert (await client.get(path)).status == 200, path


async def test_key_never_appears_in_info_or_metrics(start_proxy: ProxyFactory) -> None:
    client = await start_proxy(api_key="s3cret-value", admin_token="admin-value")
    auth = {"Authorization": "Bearer s3cret-value"}
    info = await (await client.get("/info", headers=auth)).text()
    metrics = await (await client.get("/metrics")).text()
    for text in (info, metrics):
        assert "s3cret-value" not in text and "admin-value" not in text


async def test_shutdown_route_needs_the_admin_token(start_proxy: ProxyFactory) -> None:
    from proxy.http.keys import SHUTDOWN

    client = await start_proxy(admin_token="adm1n")
    assert (await client.post("/shutdown")).status == 401
    assert (await client.post("/shutdown", headers={"Authorization": "Bearer no"})).status == 401
    assert not client.app[SHUTDOWN].is_set()
    resp = await client.post("/shutdown", headers={"Authorization": "Bearer adm1n"})
    assert resp.status == 202
    assert client.app[SHUTDOWN].is_set()


async def test_shutdown_route_is_off_without_a_token(start_proxy: ProxyFactory) -> None:
    client = await start_proxy()
    assert (await client.post("/shutdown")).status == 404
