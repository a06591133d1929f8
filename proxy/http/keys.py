"""Typed keys of what the app owns; handlers reach the app's resources only through these."""

from __future__ import annotations

import asyncio

from aiohttp import web

from proxy.cache import EmbeddingCache
from proxy.jobs.base import JobStore
from proxy.metrics import Metrics
from proxy.observe import Observer
from proxy.registry import Registry
from proxy.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
REGISTRY = web.AppKey("registry", Registry)
SHUTDOWN = web.AppKey("shutdown", asyncio.Event)  # set to ask the server to stop
DRAINING = web.AppKey("draining", asyncio.Event)  # set once stopping: refuse new work
JOBS: web.AppKey[JobStore] = web.AppKey("jobs")
CACHE = web.AppKey("cache", EmbeddingCache)  # absent when CACHE_SIZE_MB is 0
OBSERVER = web.AppKey("observer", Observer)  # hooks, tracing, per-model metrics
