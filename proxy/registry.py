"""The registry: several models, each with versions, a traffic split and shadow traffic,
behind one proxy.

What routes a request is an immutable :class:`Snapshot` (models, their versions' services,
weights, shadows, the default). Every change (an admin route, a reload of MODELS_CONFIG,
SIGHUP) builds its new snapshot aside, starts and checks whatever new versions it needs
first, and only then swaps it in with one assignment; a request sees the old snapshot or the
new one, never a mix. Versions that leave routing finish what they hold, then close.

A request names ``name`` (the split picks the version) or ``name@version``. The split is
sticky: the same user (OpenAI's ``user``, or X-User-Id) always lands on the same version, and
without one the same input text does; the choice is a hash, not a coin, so every replica of
the proxy agrees.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import random
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any

from proxy import errors
from proxy.cache import CacheUse, EmbeddingCache
from proxy.context import RequestContext
from proxy.errors import ApiError, ErrorType, ModelNotFoundError
from proxy.metrics import Metrics
from proxy.models_config import (
    DEFAULT_ALIAS,
    ModelsConfig,
    ModelsConfigError,
    ShadowConfig,
    VersionConfig,
    check_model_name,
    check_shadow,
    check_traffic,
    check_version_name,
    default_model,
    load_models_config,
    traffic_of,
)
from proxy.service import EmbeddingService, RetiredError
from proxy.settings import Settings, UpstreamSettings
from proxy.shadow import ShadowJob, ShadowRunner
from proxy.tracing import RequestSpan, Tracing
from proxy.upstream.base import EmbedInput, EmbedOptions, Upstream, Vector

log = logging.getLogger(__name__)

UpstreamFactory = Callable[[UpstreamSettings, Settings], Upstream]

# The version of the one model a proxy without MODELS_CONFIG serves.
SINGLE_VERSION = "1"
PROBE_TEXT = "probe"


class VersionState(StrEnum):
    LOADING = "loading"  # starting: reading /info, loading, probing
    READY = "ready"  # routable
    DRAINING = "draining"  # out of routing, finishing what it holds
    FAILED = "failed"  # its start or probe failed; never routable


class ModelVersion:
    """One version of a model: what it was configured with, its service and its state."""

    __slots__ = ("error", "loader", "service", "spec", "state")

    def __init__(self, service: EmbeddingService, spec: VersionConfig | None) -> None:
        self.service = service
        self.spec = spec  # None: made from the flat settings (no MODELS_CONFIG)
        self.state = VersionState.LOADING
        self.error: str | None = None
        self.loader: asyncio.Task[None] | None = None  # its start at start-up, while running

    @property
    def model(self) -> str:
        return self.service.model or ""

    @property
    def version(self) -> str:
        return self.service.version

    def describe(self, weight: int) -> dict[str, Any]:
        s = self.service
        c = s.config
        return {
            "version": self.version,
            "state": self.state.value,
            "error": self.error,
            "traffic": weight,
            "kind": c.kind,
            "upstream_model_id": s.info.model_id if s.info is not None else None,
            "replicas": s.resilient.replica_status(),
            "queue_depth": s.queue_depth,
            "in_flight": s.in_flight,
            "concurrency_limit": s.concurrency_limit,
            "breaker_open": s.breaker.is_open,
            "settings": {
                "upstream_timeout": c.upstream_timeout,
                "request_timeout": c.request_timeout,
                "max_batch_size": c.max_batch_size,
                "max_wait_time": c.max_wait_time,
                "max_concurrent_batches": c.max_concurrent_batches,
                "max_queue_size": c.max_queue_size,
                "upstream_model": c.upstream_model,
            },
        }


@dataclass(frozen=True, slots=True)
class Shadow:
    version: str
    percent: float


@dataclass(frozen=True, slots=True)
class ModelEntry:
    name: str
    versions: Mapping[str, ModelVersion]
    # (version, weight) for versions with a weight above 0, in version-name order: every
    # replica of the proxy cuts the same ranges, so a user lands on the same version on each.
    traffic: tuple[tuple[str, int], ...]
    shadow: Shadow | None = None

    @property
    def weights(self) -> dict[str, int]:
        return dict(self.traffic)

    def weight(self, version: str) -> int:
        return self.weights.get(version, 0)


@dataclass(frozen=True, slots=True)
class Snapshot:
    models: Mapping[str, ModelEntry]
    default: str
    # With MODELS_CONFIG an unknown name is a 404; without it (one model, as before) any
    # name means the default, as TEI ignores OpenAI's `model`.
    strict: bool


def make_entry(
    name: str,
    versions: Mapping[str, ModelVersion],
    weights: Mapping[str, int],
    shadow: Shadow | None,
) -> ModelEntry:
    return ModelEntry(
        name=name,
        versions=MappingProxyType(dict(versions)),
        traffic=tuple(sorted((v, w) for v, w in weights.items() if w > 0)),
        shadow=shadow,
    )


def split_selector(selector: str) -> tuple[str, str | None]:
    """``name`` or ``name@version``."""
    name, at, version = selector.rpartition("@")
    if not at:
        return selector, None
    return name, version


def split_point(model: str, ctx: RequestContext, inputs: Sequence[EmbedInput]) -> float:
    """Where in [0, 1) this request falls on the model's traffic ranges: a hash of the user,
    or without one of the input text. The model's name is mixed in, so a user's place on
    one model's split says nothing of another's."""
    digest = hashlib.blake2b(model.encode(), digest_size=8)
    if ctx.user:
        digest.update(b"\x00u\x00" + ctx.user.encode("utf-8", "surrogatepass"))
    else:
        digest.update(b"\x00t")
        for item in inputs:
            if isinstance(item, str):
                digest.update(b"\x00" + item.encode("utf-8", "surrogatepass"))
            else:
                digest.update(b"\x01" + ",".join(map(str, item)).encode())
    return int.from_bytes(digest.digest(), "big") / 2.0**64


def pick(traffic: Sequence[tuple[str, int]], point: float) -> str:
    total = sum(w for _, w in traffic)
    target = point * total
    cumulative = 0
    for version, weight in traffic:
        cumulative += weight
        if target < cumulative:
            return version
    return traffic[-1][0]


class Registry:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        upstream_factory: UpstreamFactory,
        *,
        tracing: Tracing | None = None,
        cache: EmbeddingCache | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self._factory = upstream_factory
        self._tracing = tracing
        self.cache = cache  # shared by every version's service
        self._snapshot: Snapshot | None = None
        # Versions outside the snapshot, shown by GET /admin/models: being registered,
        # failed to register, or draining after they left routing.
        self._aside: dict[tuple[str, str], ModelVersion] = {}
        self._lock = asyncio.Lock()  # one change at a time
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.started_at = int(time.time())  # `created` of GET /v1/models
        self.shadow = ShadowRunner(
            self._shadow_target,
            metrics,
            queue_size=settings.shadow_queue_size,
            concurrency=settings.shadow_concurrency,
        )

    @property
    def config_path(self) -> Path | None:
        return self.settings.models_config

    @property
    def snapshot(self) -> Snapshot:
        if self._snapshot is None:
            raise errors.unavailable("starting")
        return self._snapshot

    # -- start and stop -----------------------------------------------------------------

    async def start(self) -> None:
        """Start every version. Returns once the default model can serve; the other models
        keep loading in the background (their requests get 503 until they can), so one slow
        upstream never holds the others back."""
        self.shadow.start()
        path = self.config_path
        if path is None:
            await self._start_single()
            return
        try:
            config = load_models_config(path, self.settings)
        except ModelsConfigError as exc:
            raise RuntimeError(f"MODELS_CONFIG {path}: {exc}") from None
        snapshot, started = self._build_initial(config)
        self._snapshot = snapshot
        default = snapshot.models[snapshot.default]
        waits = []
        for mv in started:
            task = mv.loader = self._spawn(self._load_initial(mv))
            if mv.model == default.name and default.weight(mv.version) > 0:
                waits.append(task)
        await asyncio.gather(*waits)
        if not any(default.versions[v].state is VersionState.READY for v, _ in default.traffic):
            reasons = "; ".join(
                f"{mv.service.label}: {mv.error}" for mv in default.versions.values() if mv.error
            )
            raise RuntimeError(f"the default model {default.name} cannot serve: {reasons}")

    async def _start_single(self) -> None:
        """No MODELS_CONFIG: one model from the flat settings, named after the upstream's
        model id, with the alias `default`. Started as before: wait for the upstream."""
        config = self.settings.upstream_settings()
        service = EmbeddingService(
            None,
            SINGLE_VERSION,
            self._factory(config, self.settings),
            self.settings,
            config,
            self.metrics,
            tracing=self._tracing,
            cache=self.cache,
        )
        mv = ModelVersion(service, None)
        try:
            await service.start()
        except BaseException:
            await service.close()
            raise
        mv.state = VersionState.READY
        entry = make_entry(mv.model, {SINGLE_VERSION: mv}, {SINGLE_VERSION: 100}, None)
        self._snapshot = Snapshot(MappingProxyType({entry.name: entry}), entry.name, False)

    def _build_initial(self, config: ModelsConfig) -> tuple[Snapshot, list[ModelVersion]]:
        started: list[ModelVersion] = []
        models: dict[str, ModelEntry] = {}
        for name, model in config.models.items():
            versions = {}
            for version, spec in model.versions.items():
                mv = self._new_version(name, version, spec)
                versions[version] = mv
                started.append(mv)
            models[name] = make_entry(name, versions, traffic_of(model), _shadow_of(model.shadow))
        snapshot = Snapshot(MappingProxyType(models), default_model(config), True)
        return snapshot, started

    def _new_version(self, name: str, version: str, spec: VersionConfig) -> ModelVersion:
        try:
            config = spec.resolve(self.settings)
        except ModelsConfigError as exc:
            raise errors.validation(str(exc)) from None
        upstream = self._factory(config, self.settings)
        service = EmbeddingService(
            name,
            version,
            upstream,
            self.settings,
            config,
            self.metrics,
            tracing=self._tracing,
            cache=self.cache,
        )
        return ModelVersion(service, spec)

    async def _load_initial(self, mv: ModelVersion) -> None:
        """A version of MODELS_CONFIG at start-up: wait for its upstream as a single model
        does (TEI may be downloading its model), then probe it."""
        try:
            await mv.service.start()
            await self._probe(mv.service)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            mv.state, mv.error = VersionState.FAILED, _reason(exc)
            log.error("%s failed to start: %s", mv.service.label, mv.error)
            return
        finally:
            mv.loader = None
        mv.state = VersionState.READY
        log.info("%s is ready", mv.service.label)

    async def _probe(self, service: EmbeddingService) -> None:
        ctx = RequestContext.internal(timeout_s=service.config.request_timeout)
        ctx.model, ctx.version = service.model, service.version
        # The probe checks the upstream: it must reach it, never a cached vector.
        ctx.cache = CacheUse(read=False, write=False)
        await service.embed([PROBE_TEXT], EmbedOptions(), ctx)

    def _all_versions(self) -> list[ModelVersion]:
        found: dict[int, ModelVersion] = {id(mv): mv for mv in self._aside.values()}
        if self._snapshot is not None:
            for entry in self._snapshot.models.values():
                for mv in entry.versions.values():
                    found[id(mv)] = mv
        return list(found.values())

    async def drain(self) -> None:
        """Shutdown: every version finishes what it holds. Shadow copies are dropped."""
        await self.shadow.close()
        await asyncio.gather(*(mv.service.drain() for mv in self._all_versions()))

    async def close(self) -> None:
        """Whatever is still queued or in flight fails with 503."""
        if self._closed:
            return
        self._closed = True
        await self.shadow.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(
            *(mv.service.close() for mv in self._all_versions()), return_exceptions=True
        )

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- routing --------------------------------------------------------------------------

    def _entry(self, snapshot: Snapshot, name: str | None, pinned: bool) -> ModelEntry:
        if name is None or name == "" or name == DEFAULT_ALIAS:
            return snapshot.models[snapshot.default]
        entry = snapshot.models.get(name)
        if entry is None:
            if snapshot.strict or pinned:
                raise ModelNotFoundError(name)
            return snapshot.models[snapshot.default]
        return entry

    def resolve(
        self,
        ctx: RequestContext,
        inputs: Sequence[EmbedInput] = (),
        *,
        fall_back_to_split: bool = False,
    ) -> tuple[ModelEntry, ModelVersion]:
        """The version this request goes to; records it in ``ctx`` and sets its deadline
        from that version's REQUEST_TIMEOUT. ``fall_back_to_split``: a pinned version that
        is gone is replaced by the model's split (async jobs accepted before a rollout)."""
        snapshot = self.snapshot
        requested = ctx.requested_model
        name, version = split_selector(requested) if requested else (None, None)
        entry = self._entry(snapshot, name, version is not None)
        if version is not None:
            mv = entry.versions.get(version)
            if mv is None or mv.state is not VersionState.READY:
                if fall_back_to_split:
                    mv = self._split(entry, ctx, inputs)
                elif mv is not None and mv.state is VersionState.LOADING:
                    raise errors.unavailable(f"model {entry.name}@{version} is loading")
                else:
                    raise ModelNotFoundError(f"{entry.name}@{version}")
        else:
            mv = self._split(entry, ctx, inputs)
        ctx.model, ctx.version = entry.name, mv.version
        # REQUEST_TIMEOUT counts from here, once the body is read and parsed (reading it has
        # its own bound, BODY_READ_TIMEOUT), as it did before there were several models.
        ctx.deadline = min(ctx.deadline_limit, time.monotonic() + mv.service.config.request_timeout)
        return entry, mv

    def _split(
        self, entry: ModelEntry, ctx: RequestContext, inputs: Sequence[EmbedInput]
    ) -> ModelVersion:
        traffic = entry.traffic
        if len(traffic) == 1:  # one version takes all: no hash to compute
            chosen = entry.versions[traffic[0][0]]
            if chosen.state is VersionState.READY:
                return chosen
        point = split_point(entry.name, ctx, inputs)
        chosen = entry.versions[pick(traffic, point)]
        if chosen.state is VersionState.READY:
            return chosen
        # Only while a version of the split is still starting (or failed to): the ready
        # ones share its traffic meanwhile.
        ready = [(v, w) for v, w in entry.traffic if entry.versions[v].state is VersionState.READY]
        if not ready:
            loading = any(entry.versions[v].state is VersionState.LOADING for v, _ in entry.traffic)
            raise errors.unavailable(
                f"model {entry.name} is loading"
                if loading
                else f"model {entry.name} has no version that can serve"
            )
        return entry.versions[pick(ready, point)]

    async def embed(
        self,
        inputs: Sequence[EmbedInput],
        options: EmbedOptions,
        ctx: RequestContext,
        *,
        fall_back_to_split: bool = False,
    ) -> tuple[ModelVersion, list[Vector]]:
        """Route and embed; a copy may go to the model's shadow version afterwards."""
        entry, mv = self.resolve(ctx, inputs, fall_back_to_split=fall_back_to_split)
        return await self.embed_routed(
            entry, mv, inputs, options, ctx, fall_back_to_split=fall_back_to_split
        )

    async def embed_routed(
        self,
        entry: ModelEntry,
        mv: ModelVersion,
        inputs: Sequence[EmbedInput],
        options: EmbedOptions,
        ctx: RequestContext,
        *,
        trace: RequestSpan | None = None,
        fall_back_to_split: bool = False,
    ) -> tuple[ModelVersion, list[Vector]]:
        """Embed on the version :meth:`resolve` picked (request hooks run in between)."""
        try:
            vectors = await mv.service.embed(inputs, options, ctx, trace=trace)
        except RetiredError:
            # It left routing between the pick and the queue: pick again, once.
            entry, mv = self.resolve(ctx, inputs, fall_back_to_split=fall_back_to_split)
            vectors = await mv.service.embed(inputs, options, ctx, trace=trace)
        self.shadow_copy(entry, mv, inputs, options, ctx, vectors)
        return mv, vectors

    async def embed_each(
        self, inputs: Sequence[EmbedInput], options: EmbedOptions, ctx: RequestContext
    ) -> tuple[ModelVersion, list[Vector | ApiError]]:
        entry, mv = self.resolve(ctx, inputs)
        return await self.embed_each_routed(entry, mv, inputs, options, ctx)

    async def embed_each_routed(
        self,
        entry: ModelEntry,
        mv: ModelVersion,
        inputs: Sequence[EmbedInput],
        options: EmbedOptions,
        ctx: RequestContext,
        *,
        trace: RequestSpan | None = None,
    ) -> tuple[ModelVersion, list[Vector | ApiError]]:
        try:
            results = await mv.service.embed_each(inputs, options, ctx, trace=trace)
        except RetiredError:
            entry, mv = self.resolve(ctx, inputs)
            results = await mv.service.embed_each(inputs, options, ctx, trace=trace)
        embedded: list[EmbedInput] = []
        vectors: list[Vector] = []
        for item, result in zip(inputs, results, strict=True):
            if not isinstance(result, ApiError):
                embedded.append(item)
                vectors.append(result)
        if vectors:
            self.shadow_copy(entry, mv, embedded, options, ctx, vectors)
        return mv, results

    def shadow_copy(
        self,
        entry: ModelEntry,
        mv: ModelVersion,
        inputs: Sequence[EmbedInput],
        options: EmbedOptions,
        ctx: RequestContext,
        vectors: Sequence[Vector],
    ) -> None:
        shadow = entry.shadow
        if shadow is None or shadow.version == mv.version:
            return
        if random.random() * 100.0 >= shadow.percent:
            return
        ctx.shadow_version = shadow.version
        self.shadow.offer(
            ShadowJob(
                model=entry.name,
                version=mv.version,
                shadow_version=shadow.version,
                inputs=list(inputs),
                options=options,
                primary=list(vectors),
                request_id=ctx.request_id,
            )
        )

    def _shadow_target(self, model: str, version: str) -> EmbeddingService | None:
        snapshot = self._snapshot
        entry = snapshot.models.get(model) if snapshot is not None else None
        mv = entry.versions.get(version) if entry is not None else None
        if mv is None or mv.state is not VersionState.READY:
            return None
        return mv.service

    # -- health, info, listing ------------------------------------------------------------

    async def unhealthy_reason(self, ctx: RequestContext) -> str | None:
        """None when ready. A request that names a model asks about that model (or
        name@version); otherwise the proxy is ready while any model can serve."""
        snapshot = self.snapshot
        if ctx.requested_model:
            entry, mv = self.resolve(ctx)
            if split_selector(ctx.requested_model)[1] is not None:
                return await mv.service.unhealthy_reason()
            return await self._model_unhealthy(entry)
        reasons = []
        for entry in sorted(snapshot.models.values(), key=lambda e: e.name != snapshot.default):
            reason = await self._model_unhealthy(entry)
            if reason is None:
                return None
            reasons.append(reason)
        return reasons[0]

    @staticmethod
    async def _model_unhealthy(entry: ModelEntry) -> str | None:
        first: str | None = None
        for version, _ in entry.traffic:
            mv = entry.versions[version]
            if mv.state is VersionState.READY:
                reason = await mv.service.unhealthy_reason()
            elif mv.state is VersionState.LOADING:
                reason = "starting"
            else:
                reason = f"unhealthy: {mv.error or mv.state.value}"
            if reason is None:
                return None
            first = first or reason
        return first or "unhealthy"

    def info(self, ctx: RequestContext) -> dict[str, Any]:
        """/info of the model the request names: of its pinned version, else of the version
        with the most traffic."""
        requested = ctx.requested_model
        pinned = requested is not None and split_selector(requested)[1] is not None
        if pinned:
            entry, mv = self.resolve(ctx)
        else:
            entry = self._entry(self.snapshot, requested, False)
            ready = [
                (w, v) for v, w in entry.traffic if entry.versions[v].state is VersionState.READY
            ]
            if not ready:
                raise errors.unavailable(f"model {entry.name} is loading")
            mv = entry.versions[max(ready)[1]]
            ctx.model, ctx.version = entry.name, mv.version
        body = mv.service.describe()
        body["proxy"]["model"] = entry.name
        body["proxy"]["traffic"] = entry.weights
        return body

    def routed_versions(self) -> list[tuple[dict[str, float], ModelVersion]]:
        """Every version in routing with its model's traffic shares (fractions of 1), for
        the status page; models in name order."""
        out = []
        snapshot = self.snapshot
        for name in sorted(snapshot.models):
            entry = snapshot.models[name]
            total = sum(w for _, w in entry.traffic) or 1
            shares = {v: w / total for v, w in entry.traffic}
            out += [(shares, entry.versions[v]) for v in sorted(entry.versions)]
        return out

    def model_names(self) -> list[str]:
        return sorted(self.snapshot.models)

    def describe(self) -> dict[str, Any]:
        """GET /admin/models: every model and version, routable or not."""
        snapshot = self.snapshot
        models = []
        for name in sorted(snapshot.models):
            entry = snapshot.models[name]
            weights = entry.weights
            versions = [
                entry.versions[v].describe(weights.get(v, 0)) for v in sorted(entry.versions)
            ]
            versions += [
                mv.describe(0)
                for (model, version), mv in sorted(self._aside.items())
                if model == name and mv not in entry.versions.values()
            ]
            models.append(
                {
                    "name": name,
                    "aliases": [DEFAULT_ALIAS] if name == snapshot.default else [],
                    "traffic": weights,
                    "shadow": dataclasses.asdict(entry.shadow) if entry.shadow else None,
                    "versions": versions,
                }
            )
        # Models that only exist aside (e.g. a first version that failed to register, or a
        # model a reload removed, still draining).
        aside: dict[str, list[dict[str, Any]]] = {}
        for (model, _), mv in sorted(self._aside.items()):
            if model not in snapshot.models:
                aside.setdefault(model, []).append(mv.describe(0))
        for model, versions in aside.items():
            models.append(
                {"name": model, "aliases": [], "traffic": {}, "shadow": None, "versions": versions}
            )
        return {
            "default": snapshot.default,
            "models_config": str(self.config_path) if self.config_path else None,
            "shadow_queued": self.shadow.queued,
            "models": models,
        }

    def service(self, model: str | None = None, version: str | None = None) -> EmbeddingService:
        """A version's service (tests and tools); the default model's main one by default."""
        snapshot = self.snapshot
        entry = self._entry(snapshot, model, True)
        if version is None:
            version = max((w, v) for v, w in entry.traffic)[1]
        return entry.versions[version].service

    # -- changes at run time --------------------------------------------------------------

    async def _start_checked(self, name: str, version: str, spec: VersionConfig) -> ModelVersion:
        """Start a version aside, check its upstream's /info and embed a probe, all within
        MODEL_LOAD_TIMEOUT. Raises with the reason; leaves it FAILED (and closed) aside."""
        mv = self._new_version(name, version, spec)
        key = (name, version)
        self._aside[key] = mv
        timeout_s = self.settings.model_load_timeout
        try:
            step = "start"
            async with asyncio.timeout(timeout_s):
                await mv.service.start()  # TEI's /info; the openai probe; loading the model
                step = "probe embedding"
                await self._probe(mv.service)
        except (Exception, asyncio.CancelledError) as exc:
            reason = _reason(exc)
            if isinstance(exc, TimeoutError):
                last = getattr(mv.service.upstream, "last_not_ready", None)
                reason = f"not ready within MODEL_LOAD_TIMEOUT={timeout_s:g}s" + (
                    f" (last: {last})" if last else ""
                )
            mv.state, mv.error = VersionState.FAILED, f"{step}: {reason}"
            await mv.service.close()
            if isinstance(exc, asyncio.CancelledError):
                self._aside.pop(key, None)
                raise
            raise ApiError(
                502, f"{name}@{version} was not registered: {mv.error}", ErrorType.UPSTREAM
            ) from None
        mv.state = VersionState.READY
        del self._aside[key]
        return mv

    def _swap(self, snapshot: Snapshot, retired: Sequence[ModelVersion]) -> None:
        self._snapshot = snapshot
        still_routed = {id(mv) for e in snapshot.models.values() for mv in e.versions.values()}
        for mv in retired:
            if id(mv) not in still_routed:
                self._retire(mv)

    def _retire(self, mv: ModelVersion) -> None:
        """Out of routing: it finishes what it holds (within SHUTDOWN_TIMEOUT), then closes."""
        previous = mv.state
        mv.state = VersionState.DRAINING
        key = (mv.model, mv.version)
        self._aside[key] = mv

        async def retire() -> None:
            try:
                if previous is VersionState.LOADING:
                    loader = mv.loader
                    if loader is not None:  # still waiting for its upstream: stop that
                        loader.cancel()
                        await asyncio.gather(loader, return_exceptions=True)
                    await mv.service.close()
                else:
                    await mv.service.retire(self.settings.shutdown_timeout)
            finally:
                if self._aside.get(key) is mv:
                    del self._aside[key]
                self._forget_vectors(mv)
                log.info("%s closed", mv.service.label)

        self._spawn(retire())

    def _forget_vectors(self, mv: ModelVersion) -> None:
        """A version that left the registry takes its cached vectors with it, unless a
        version of the same name routes again (a replacement: its keys name its own
        upstream, so it never reads the old vectors; they age out)."""
        if self.cache is None or self._snapshot is None:
            return
        entry = self._snapshot.models.get(mv.model)
        if entry is not None and mv.version in entry.versions:
            return
        dropped = self.cache.evict_version(mv.model, mv.version)
        if dropped:
            log.info("%s: %d cached vectors dropped", mv.service.label, dropped)

    async def put_version(
        self, name: str, version: str, spec: VersionConfig
    ) -> tuple[bool, ModelVersion]:
        """Start, check and add (or replace) a version. A new model gets all its traffic;
        a new version of a known model none until its traffic is set; a replaced version
        keeps its weight and shadow role. True when the version is new."""
        for problem in (check_model_name(name), check_version_name(version)):
            if problem is not None:
                raise errors.validation(problem)
        async with self._lock:
            mv = await self._start_checked(name, version, spec)
            snapshot = self.snapshot
            entry = snapshot.models.get(name)
            old = entry.versions.get(version) if entry is not None else None
            if entry is None:
                new_entry = make_entry(name, {version: mv}, {version: 100}, None)
            else:
                versions = {**entry.versions, version: mv}
                new_entry = make_entry(name, versions, entry.weights, entry.shadow)
            self._swap(_with_model(snapshot, new_entry), [old] if old is not None else [])
            log.info("%s %s", mv.service.label, "replaced" if old else "added")
            return old is None, mv

    async def delete_version(self, name: str, version: str) -> ModelVersion:
        async with self._lock:
            snapshot = self.snapshot
            entry = snapshot.models.get(name)
            mv = entry.versions.get(version) if entry is not None else None
            if entry is None or mv is None:
                raise ModelNotFoundError(f"{name}@{version}")
            weights = entry.weights
            if entry.shadow is not None and entry.shadow.version == version:
                raise _conflict(f"{name}@{version} is the shadow target; change the shadow first")
            others = {v: w for v, w in weights.items() if v != version}
            if weights.get(version, 0) > 0 and not others:
                raise _conflict(
                    f"{name}@{version} is the only version with traffic; shift the traffic "
                    "to another version first"
                )
            versions = {v: m for v, m in entry.versions.items() if v != version}
            self._swap(
                _with_model(snapshot, make_entry(name, versions, others, entry.shadow)), [mv]
            )
            log.info("%s removed from routing", mv.service.label)
            return mv

    async def set_traffic(self, name: str, weights: dict[str, int]) -> ModelEntry:
        async with self._lock:
            snapshot = self.snapshot
            entry = snapshot.models.get(name)
            if entry is None:
                raise ModelNotFoundError(name)
            try:
                check_traffic(weights, set(entry.versions), "traffic")
            except ModelsConfigError as exc:
                raise errors.validation(str(exc)) from None
            for version, weight in weights.items():
                state = entry.versions[version].state
                if weight > 0 and state is not VersionState.READY:
                    raise _conflict(f"{name}@{version} is {state.value}, not ready")
            new_entry = make_entry(name, entry.versions, weights, entry.shadow)
            self._swap(_with_model(snapshot, new_entry), [])
            log.info("%s traffic set to %s", name, new_entry.weights)
            return new_entry

    async def set_shadow(self, name: str, shadow: ShadowConfig | None) -> ModelEntry:
        async with self._lock:
            snapshot = self.snapshot
            entry = snapshot.models.get(name)
            if entry is None:
                raise ModelNotFoundError(name)
            if shadow is not None:
                try:
                    check_shadow(shadow, set(entry.versions), "shadow")
                except ModelsConfigError as exc:
                    raise errors.validation(str(exc)) from None
            new_shadow = _shadow_of(shadow)
            new_entry = make_entry(name, entry.versions, entry.weights, new_shadow)
            self._swap(_with_model(snapshot, new_entry), [])
            log.info("%s shadow set to %s", name, new_shadow)
            return new_entry

    async def reload(self) -> dict[str, Any]:
        """Re-read MODELS_CONFIG and apply the difference at once: new versions start, changed
        ones are replaced once their replacement is ready, removed ones drain. If the file is
        invalid or any new version fails its checks, nothing changes."""
        path = self.config_path
        if path is None:
            raise _conflict("MODELS_CONFIG is not set: there is no file to reload")
        try:
            config = load_models_config(path, self.settings)
        except ModelsConfigError as exc:
            raise errors.validation(f"MODELS_CONFIG {path}: {exc}") from None
        async with self._lock:
            snapshot = self.snapshot
            reuse: dict[tuple[str, str], ModelVersion] = {}
            wanted: list[tuple[str, str, VersionConfig]] = []
            for name, model in config.models.items():
                entry = snapshot.models.get(name)
                for version, spec in model.versions.items():
                    current = entry.versions.get(version) if entry is not None else None
                    if (
                        current is not None
                        and current.spec == spec
                        and current.state in (VersionState.READY, VersionState.LOADING)
                    ):
                        reuse[(name, version)] = current
                    else:
                        wanted.append((name, version, spec))
            outcomes = await asyncio.gather(
                *(self._start_checked(n, v, s) for n, v, s in wanted), return_exceptions=True
            )
            failures = [o for o in outcomes if isinstance(o, BaseException)]
            if failures:
                for outcome in outcomes:
                    if isinstance(outcome, ModelVersion):
                        await outcome.service.close()
                        self._aside.pop((outcome.model, outcome.version), None)
                messages = "; ".join(
                    f.message if isinstance(f, ApiError) else _reason(f) for f in failures
                )
                raise ApiError(502, f"reload not applied: {messages}", ErrorType.UPSTREAM) from None
            started = {
                (mv.model, mv.version): mv for mv in outcomes if isinstance(mv, ModelVersion)
            }
            models: dict[str, ModelEntry] = {}
            for name, model in config.models.items():
                versions = {v: reuse.get((name, v)) or started[(name, v)] for v in model.versions}
                models[name] = make_entry(
                    name, versions, traffic_of(model), _shadow_of(model.shadow)
                )
            new = Snapshot(MappingProxyType(models), default_model(config), True)
            for key, mv in list(self._aside.items()):
                if mv.state is VersionState.FAILED:  # the file is the truth now
                    del self._aside[key]
            old_versions = [mv for e in snapshot.models.values() for mv in e.versions.values()]
            self._swap(new, old_versions)
            summary = {
                "started": sorted(f"{n}@{v}" for n, v in started),
                "kept": sorted(f"{n}@{v}" for n, v in reuse),
                "removed": sorted(
                    mv.service.label
                    for mv in old_versions
                    if reuse.get((mv.model, mv.version)) is not mv
                ),
                "default": new.default,
            }
            log.info("MODELS_CONFIG reloaded: %s", summary)
            return summary


def _shadow_of(config: ShadowConfig | None) -> Shadow | None:
    return Shadow(config.version, config.percent) if config is not None else None


def _with_model(snapshot: Snapshot, entry: ModelEntry) -> Snapshot:
    models = {**snapshot.models, entry.name: entry}
    return Snapshot(MappingProxyType(models), snapshot.default, snapshot.strict)


def _conflict(message: str) -> ApiError:
    return ApiError(409, message, ErrorType.CONFLICT)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ApiError):
        return f"{exc.status} {exc.message}"
    return str(exc) or exc.__class__.__name__
