"""The adaptive concurrency limit, wired in: the real proxy app in front of the TEI double,
both real servers on loopback (the limiter's own rules are in tests/test_concurrency.py)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from proxy.adaptive import AdaptiveConcurrency
from proxy.concurrency import CongestionKind
from proxy.errors import ApiError
from proxy.http.keys import REGISTRY
from proxy.resilience import ResilienceConfig, ResilientUpstream
from proxy.service import EmbeddingService
from proxy.upstream.base import EmbedOptions
from proxy.upstream.tei import TeiUpstream
from tests.conftest import ProxyFactory
from tests.tei_double import Fault, TeiDouble, TeiDoubleConfig
from tests.test_embed_api import samples, value


@pytest.fixture
def tei_config() -> TeiDoubleConfig:
    # A fixed cost per call, and calls served side by side (not one at a time).
    return TeiDoubleConfig(delay_base_s=0.02)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def service_of(client: Any) -> EmbeddingService:
    service: EmbeddingService = client.app[REGISTRY].service()
    return service


async def info_concurrency(client: Any) -> dict[str, Any]:
    body = await (await client.get("/info")).json()
    shown: dict[str, Any] = body["proxy"]["concurrency"]
    return shown


async def metrics_page(client: Any) -> dict[Any, float]:
    return samples(await (await client.get("/metrics")).text())


async def post_many(client: Any, count: int, callers: int) -> list[int]:
    """``callers`` clients posting one text after another until ``count`` were sent."""
    statuses: list[int] = []
    sent = 0

    async def caller() -> None:
        nonlocal sent
        while sent < count:
            sent += 1
            resp = await client.post("/embed", json={"inputs": f"text {sent}"})
            await resp.read()
            statuses.append(resp.status)

    await asyncio.gather(*(caller() for _ in range(callers)))
    return statuses


# -- the ceiling ------------------------------------------------------------------------------


async def test_auto_ceiling_is_the_doubles_permits_over_the_batch_size(
    start_proxy: ProxyFactory,
) -> None:
    client = await start_proxy()  # MAX_CONCURRENT_BATCHES=auto, the default
    shown = await info_concurrency(client)
    info = await (await client.get("/info")).json()
    assert info["proxy"]["upstream"]["max_concurrent_requests"] == 512  # the double's /info
    assert info["proxy"]["effective_batch_size"] == 32
    assert info["proxy"]["max_concurrent_batches"] == "auto"
    assert info["proxy"]["effective_concurrent_batches"] == 16  # 512 / 32
    assert shown["ceiling"] == 16 and shown["adaptive"] is True
    assert shown["limit"] == 2  # starts at TEI's one running + one prefetched batch
    page = await metrics_page(client)
    assert value(page, "proxy_concurrency_ceiling", model="test-double/tei", version="1") == 16


async def test_auto_ceiling_counts_every_replica(
    start_proxy: ProxyFactory, tei_url: str, aiohttp_server: Any
) -> None:
    other: TestServer = await aiohttp_server(TeiDouble(TeiDoubleConfig()).make_app())
    client = await start_proxy(upstream_url=f"{tei_url},{str(other.make_url('')).rstrip('/')}")
    assert (await info_concurrency(client))["ceiling"] == 32  # 16 per replica


async def test_a_number_is_the_ceiling_and_never_above_what_the_upstream_admits(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    client = await start_proxy(max_concurrent_batches=4)
    assert (await info_concurrency(client))["ceiling"] == 4
    await client.close()
    tei_double.config.max_concurrent_requests = 64  # two calls of 32 items
    client = await start_proxy(max_concurrent_batches=8)
    assert (await info_concurrency(client))["ceiling"] == 2


async def test_the_learned_limit_never_passes_the_ceiling(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    """Calls served side by side with a fixed cost each (300 ms: slow enough that the upstream,
    not this process's CPU, is what the load waits for): more calls in flight carry more, so
    under a backlog the limit climbs, and must stop at the ceiling (96 permits / 32 = 3)."""
    tei_double.config.max_concurrent_requests = 96
    tei_double.config.delay_base_s = 0.3
    client = await start_proxy()
    service = service_of(client)
    reached_at: float | None = None
    statuses: list[int] = []
    started = time.monotonic()

    def go_on() -> bool:
        # Until the limit sat at the ceiling for a second (bounded: 20 s in all).
        nonlocal reached_at
        now = time.monotonic()
        if reached_at is None and service.batcher.limit == 3:
            reached_at = now
        return now - started < 20 and (reached_at is None or now - reached_at < 1.0)

    async def caller(n: int) -> None:
        i = 0
        while go_on():
            i += 1
            resp = await client.post("/embed", json={"inputs": f"caller {n} text {i}"})
            await resp.read()
            statuses.append(resp.status)

    await asyncio.gather(*(caller(n) for n in range(192)))
    assert statuses.count(200) == len(statuses)
    assert reached_at is not None, "the limit never climbed to the ceiling"
    assert tei_double.max_in_flight_calls <= 3
    assert service.batcher.limit <= 3
    assert (await info_concurrency(client))["ceiling"] == 3


# -- what /info and /metrics show -------------------------------------------------------------


async def test_info_and_metrics_show_the_limit_baseline_and_gradient(
    start_proxy: ProxyFactory,
) -> None:
    client = await start_proxy()
    before = await info_concurrency(client)
    assert before["baseline_ms"] is None and before["samples"] == 0
    for i in range(20):  # one at a time: lone calls, so the baseline is ~ the double's 20 ms
        assert (await client.post("/embed", json={"inputs": f"t{i}"})).status == 200
    shown = await info_concurrency(client)
    page = await metrics_page(client)
    assert shown["samples"] == 20
    assert 20.0 <= shown["baseline_ms"] < 200.0
    assert shown["recent_ms"] >= shown["baseline_ms"] * 0.5
    assert 0.5 <= shown["gradient"] <= 1.0
    assert (
        value(page, "proxy_concurrency_limit", model="test-double/tei", version="1")
        == shown["limit"]
    )
    assert value(
        page, "proxy_concurrency_baseline_seconds", model="test-double/tei", version="1"
    ) == pytest.approx(shown["baseline_ms"] / 1000)
    assert value(
        page, "proxy_concurrency_recent_seconds", model="test-double/tei", version="1"
    ) == pytest.approx(shown["recent_ms"] / 1000)
    assert (
        value(page, "proxy_concurrency_gradient", model="test-double/tei", version="1")
        == shown["gradient"]
    )
    assert (
        value(page, "proxy_concurrency_congestion_cuts_total", model="test-double/tei", version="1")
        == 0
    )


async def test_timer_dispatch_shows_its_fixed_bound(start_proxy: ProxyFactory) -> None:
    client = await start_proxy(dispatch="timer", max_concurrent_batches=3)
    shown = await info_concurrency(client)
    assert shown == {"adaptive": False, "limit": 3, "ceiling": 3}
    page = await metrics_page(client)
    assert value(page, "proxy_concurrency_limit", model="test-double/tei", version="1") == 3


# -- congestion -------------------------------------------------------------------------------


async def test_429s_from_the_double_lower_the_limit_even_when_a_retry_succeeds(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    client = await start_proxy()
    service = service_of(client)
    assert service.batcher.limit == 2
    tei_double.set_fault(Fault.OVERLOADED_429, times=1)
    resp = await client.post("/embed", json={"inputs": "refused once, then served"})
    assert resp.status == 200  # the retry got through...
    assert service.batcher.limit == 1  # ...and the limit still came down (2 * 0.75)
    shown = await info_concurrency(client)
    assert shown["congestion_cuts"] == 1 and shown["limit"] == 1
    page = await metrics_page(client)
    assert (
        value(page, "proxy_concurrency_congestion_cuts_total", model="test-double/tei", version="1")
        == 1
    )
    assert (
        value(
            page,
            "proxy_upstream_retries_total",
            model="test-double/tei",
            version="1",
            fault="overloaded",
        )
        == 1
    )
    assert value(page, "proxy_concurrency_limit", model="test-double/tei", version="1") == 1


class RecordingSignals:
    """A :class:`proxy.resilience.LoadSignals` that records what it is told."""

    def __init__(self) -> None:
        self.sizes: list[int] = []  # of each attempt that succeeded
        self.kinds: list[CongestionKind] = []  # of each attempt that said "overloaded"

    def started(self) -> tuple[int, int]:
        return 1, 0

    def served(self, latency_s: float, size: int, at_start: tuple[int, int]) -> None:
        assert latency_s > 0
        self.sizes.append(size)

    def overloaded(self, kind: CongestionKind) -> None:
        self.kinds.append(kind)


async def resilient(
    url: str, *, timeout_s: float = 5.0
) -> tuple[ResilientUpstream, RecordingSignals]:
    upstream = TeiUpstream([url], timeout_s=timeout_s)
    await upstream.start()
    signals = RecordingSignals()
    return ResilientUpstream(upstream, ResilienceConfig(), load=signals), signals


async def test_each_attempt_reports_load_and_only_overload_cuts(
    tei_url: str, tei_double: TeiDouble, unused_tcp_port: int
) -> None:
    """What reaches the limiter, attempt by attempt: a 429 and a 503 the upstream answered
    and an upstream timeout say "overloaded", retried or not; an input the upstream refused
    (422), a refused connection and the caller's own deadline say nothing."""
    tei_double.config.delay_base_s = 0.0
    up, signals = await resilient(tei_url, timeout_s=0.3)
    options = EmbedOptions()
    try:
        tei_double.set_fault(Fault.OVERLOADED_429, times=2)
        await up.embed(["a", "b"], options, deadline=time.monotonic() + 5)
        assert signals.kinds == [CongestionKind.RATE_LIMITED] * 2  # both failed tries
        assert signals.sizes == [2]  # the third, which succeeded, with its size

        tei_double.set_fault(Fault.HANG, times=1)
        with pytest.raises(ApiError) as hung:
            await up.embed(["c"], options, deadline=time.monotonic() + 0.5)
        assert signals.kinds[-1] is CongestionKind.TIMEOUT  # UPSTREAM_TIMEOUT (0.3 s)
        assert hung.value.status == 504

        count = len(signals.kinds)
        tei_double.config.delay_base_s = 1.0
        with pytest.raises(ApiError) as late:
            await up.embed(["d"], options, deadline=time.monotonic() + 0.1)
        assert late.value.status == 504  # the caller's deadline, before UPSTREAM_TIMEOUT
        assert len(signals.kinds) == count
        tei_double.config.delay_base_s = 0.0

        tei_double.config.max_input_length = 4
        with pytest.raises(ApiError) as refused:
            await up.embed(["far too many words here"], EmbedOptions(truncate=False),
                           deadline=time.monotonic() + 5)  # fmt: skip
        assert refused.value.status == 422
        assert len(signals.kinds) == count
    finally:
        await up.close()
        await up.upstream.close()

    dead, dead_signals = await resilient(tei_url)
    try:
        dead.upstream.replicas[0].base_url = f"http://127.0.0.1:{unused_tcp_port}"  # type: ignore[attr-defined]
        with pytest.raises(ApiError) as unreachable:
            await dead.embed(["e"], options, deadline=time.monotonic() + 1)
        assert unreachable.value.status == 503 and not unreachable.value.from_upstream
        assert dead_signals.kinds == []  # an outage, not load
    finally:
        await dead.close()
        await dead.upstream.close()


# -- no waiting when the upstream is idle ----------------------------------------------------


async def test_a_lone_request_is_never_held_when_the_upstream_is_idle(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    """Even once the proxy has learned an upstream that runs one call at a time (where holding
    a batch for more items can pay under load), one client sending one request after another
    is never held: every hold the batcher asks for is answered "send now", and a lone request
    is answered in about the upstream's time, never MAX_WAIT_TIME's 2 s."""
    tei_double.config.serial = True
    client = await start_proxy(max_wait_time=2000)
    service = service_of(client)
    control = service.concurrency
    assert control is not None
    statuses = await post_many(client, 600, callers=64)  # teach it: a backlog, then drained
    assert statuses.count(200) == 600
    assert control.limiter.cost_model.ready
    holds: list[float | None] = []
    ask = control.hold

    def recording_hold(*args: Any) -> float | None:
        held = ask(*args)
        holds.append(held)
        return held

    control.hold = recording_hold  # type: ignore[method-assign]
    await asyncio.sleep(0.5)  # two arrival-rate windows: the burst has faded
    for i in range(30):
        started = time.monotonic()
        resp = await client.post("/embed", json={"inputs": f"alone {i}"})
        assert resp.status == 200
        assert time.monotonic() - started < 1.0
    assert holds == [None] * len(holds)  # asked (a slot was free), and never held
    assert len(holds) >= 30


def test_the_echo_hold_waits_only_for_callers_just_answered() -> None:
    """8 callers, each sending again as soon as answered, in front of an upstream that runs
    one call at a time: sent at once, the callers split into two halves that take turns
    (batches of 4, each half waiting a whole call for the other; measured with the naive
    emulator: 164 req/s, batches of 3.8). So while the upstream is idle, a batch is held a
    moment for the callers just answered, no longer once they are back. (In-process callers
    come back within the same loop turn, so this is driven directly.)"""
    clock = Clock()
    control = AdaptiveConcurrency("m", ceiling=4, max_wait_s=0.005, clock=clock)
    for _ in range(5):  # a serial upstream: 20 ms a call, one at a time
        clock.now += 0.02
        control.served(0.02, 8, (1, 0))
    assert control.limiter.cost_model.a > 0.01
    control.arrived(40, clock.now)  # every caller answered so far came back
    clock.now += 0.02
    control.served(0.02, 4, (1, 0))  # 4 answered now; 4 others queued meanwhile
    wait = control.hold(4, 0, 32, clock.now, clock.now - 0.015)
    assert wait is not None and 0 < wait <= 0.005  # held, within MAX_WAIT_TIME
    control.arrived(3, clock.now + 0.001)
    assert control.hold(7, 0, 32, clock.now + 0.001, clock.now - 0.015) is not None
    control.arrived(1, clock.now + 0.002)  # the last one is back: send
    assert control.hold(8, 0, 32, clock.now + 0.002, clock.now - 0.015) is None
    assert control.hold(4, 1, 32, clock.now, clock.now) is None  # a call in flight: no
    clock.now += 1.0
    control.served(0.02, 1, (1, 0))  # long after: the old echo is forgotten
    control.arrived(1, clock.now + 0.001)
    assert control.hold(1, 0, 32, clock.now + 0.001, clock.now + 0.001) is None


def test_the_echo_hold_also_waits_in_front_of_an_upstream_that_merges_calls() -> None:
    """TEI cuts its next batch from whatever is queued when one starts: the first caller
    back, sent alone, would make the others wait a whole batch more. So in front of an
    upstream that merges calls the echo is waited for too, even with calls in flight."""
    clock = Clock()
    control = AdaptiveConcurrency("m", ceiling=16, max_wait_s=0.005, clock=clock)
    for size in (1, 8, 16, 32) * 3:  # lone calls: a = 20 ms, b = 0.2 ms
        clock.now += 0.05
        control.served(0.020 + 0.0002 * size, size, (1, 0))
    for _ in range(20):  # four calls at once cost one batch of their items: merged
        clock.now += 0.05
        control.served(0.020 + 0.0002 * 64, 16, (4, 0))
    assert control.limiter.merges_calls is True
    control.arrived(1000, clock.now)  # every caller answered so far came back
    clock.now += 0.02
    control.served(0.03, 8, (1, 0))  # 8 answered now
    control.arrived(1, clock.now + 0.0005)  # the first is back, a call is in flight
    wait = control.hold(1, 1, 32, clock.now + 0.0005, clock.now + 0.0005)
    assert wait is not None and 0 < wait <= 0.005
    control.arrived(7, clock.now + 0.001)  # all back: send
    assert control.hold(8, 1, 32, clock.now + 0.001, clock.now + 0.0005) is None
