"""API_KEY and ADMIN_TOKEN, as TEI's --api-key: 401 with an empty body, public health."""

from __future__ import annotations

from tests.conftest import ProxyFactory

# Secrets of at least 16 characters: the settings refuse shorter ones.
KEY = "s3cret-api-key-for-tests"
ADMIN = "adm1n-token-for-tests"


async def test_api_key_guards_data_routes(start_proxy: ProxyFactory) -> None:
    client = await start_proxy(api_key=KEY)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        resp = await client.post("/embed", json={"inputs": "x"}, headers=headers)
        assert resp.status == 401
        assert await resp.read() == b""
        assert (await client.get("/info", headers=headers)).status == 401
    ok = await client.post(
        "/embed", json={"inputs": "x"}, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert ok.status == 200
    for path in ("/health", "/ping", "/", "/metrics", "/openapi.json"):
        assert (await client.get(path)).status == 200, path


async def test_key_never_appears_in_info_or_metrics(start_proxy: ProxyFactory) -> None:
    client = await start_proxy(api_key=KEY, admin_token=ADMIN)
    auth = {"Authorization": f"Bearer {KEY}"}
    info = await (await client.get("/info", headers=auth)).text()
    metrics = await (await client.get("/metrics")).text()
    for text in (info, metrics):
        assert KEY not in text and ADMIN not in text


async def test_shutdown_route_needs_the_admin_token(start_proxy: ProxyFactory) -> None:
    from proxy.http.keys import SHUTDOWN

    client = await start_proxy(admin_token=ADMIN)
    assert (await client.post("/shutdown")).status == 401
    assert (await client.post("/shutdown", headers={"Authorization": "Bearer no"})).status == 401
    assert not client.app[SHUTDOWN].is_set()
    resp = await client.post("/shutdown", headers={"Authorization": f"Bearer {ADMIN}"})
    assert resp.status == 202
    assert client.app[SHUTDOWN].is_set()


async def test_shutdown_route_is_off_without_a_token(start_proxy: ProxyFactory) -> None:
    client = await start_proxy()
    assert (await client.post("/shutdown")).status == 404


async def test_head_needs_the_key_wherever_get_does(start_proxy: ProxyFactory) -> None:
    # aiohttp answers HEAD on every GET route: without the key, HEAD /predict/{id} must not
    # tell a job's state (or existence) by its status code.
    client = await start_proxy(api_key=KEY)
    auth = {"Authorization": f"Bearer {KEY}"}
    for path in ("/predict/some-prediction-id", "/info"):
        assert (await client.head(path)).status == 401, path
        assert (await client.head(path, headers={"Authorization": "Bearer no"})).status == 401
        assert (await client.request("OPTIONS", path)).status == 401, path
    assert (await client.head("/predict/some-prediction-id", headers=auth)).status == 404
    assert (await client.head("/info", headers=auth)).status == 200
    # Public routes stay public for HEAD too.
    for path in ("/health", "/ping", "/", "/metrics", "/openapi.json", "/docs"):
        assert (await client.head(path)).status == 200, path
