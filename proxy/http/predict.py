"""``/predict``: embed one text now, or, with ``Async-Mode: true``, accept it as a job and
let the caller poll ``GET /predict/{prediction_id}``.

The paths, status codes and messages are a contract with existing clients. A failed job
answers 424 (Failed Dependency) with the cause, so a client can tell it from 404 (unknown id)
and 400 (still processing).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxy import errors
from proxy.context import context_of
from proxy.errors import ErrorType
from proxy.http.common import json_response
from proxy.http.keys import JOBS, REGISTRY, SETTINGS
from proxy.http.models import PredictRequest
from proxy.http.parsing import read_json, require_object, validate
from proxy.http.pipeline import before_hooks, embed_request
from proxy.jobs.base import JobQueueFullError, JobStoreUnavailableError
from proxy.observe import OBSERVATION
from proxy.upstream.base import EmbedOptions, Vector

ACCEPTED_MESSAGE = "Request received. Processing asynchronously."
NOT_FOUND_MESSAGE = "Prediction ID not found."
PENDING_MESSAGE = "Prediction is still being processed."


def as_floats(vec: Vector) -> list[float]:
    tolist = getattr(vec, "tolist", None)
    return tolist() if callable(tolist) else list(vec)


def _parse(body: Any) -> tuple[str, str | None]:
    """The text and the model it names (None: the X-Model header's, else the default)."""
    if type(body) is dict and len(body) == 1 and type(body.get("input")) is str and body["input"]:
        return str(body["input"]), None  # the common body: nothing else to validate
    require_object(body, "input")
    request = validate(PredictRequest, body)
    return request.input, request.model


def _is_async(request: web.Request) -> bool:
    return request.headers.get("Async-Mode", "").strip().lower() in ("true", "1", "yes")


async def predict(request: web.Request) -> web.Response:
    body = await read_json(request)
    text, model = _parse(body)
    ctx = context_of(request)
    if model:
        ctx.requested_model = model
    if _is_async(request):
        # The job remembers the version picked now. Jobs run later, with no request to
        # answer: `before` hooks run now, on what is queued; `after` hooks and capture are
        # for synchronous answers only.
        _, version = request.app[REGISTRY].resolve(ctx, [text])
        obs = request[OBSERVATION]
        obs.model, obs.version = ctx.model, ctx.version
        (job_text,), _ = await before_hooks(request, obs, [text], ctx.user)
        assert isinstance(job_text, str)  # hooks keep each input's kind of item
        # The same checks as the synchronous path, so a job never fails for its input later.
        version.service.validate([job_text], EmbedOptions())
        jobs = request.app[JOBS]
        if jobs.kind == "memory" and request.app[SETTINGS].workers > 1:
            # Each worker has its own memory store: a poll reaching another worker would
            # answer 404 for a job that exists. Refuse rather than lose track of jobs.
            raise errors.unavailable(
                "async jobs with WORKERS > 1 need JOB_STORE=redis://...: the memory store "
                "is per worker process"
            )
        try:
            prediction_id = await jobs.submit(job_text, model=ctx.served_as)
        except JobQueueFullError as exc:
            raise errors.overloaded() from exc
        except JobStoreUnavailableError as exc:
            raise errors.unavailable(f"job store unavailable: {exc}") from exc
        return json_response(
            {"message": ACCEPTED_MESSAGE, "prediction_id": prediction_id}, status=202
        )
    _, _, vectors = await embed_request(request, [text], EmbedOptions())
    return json_response({"input": text, "result": vectors[0]})


async def prediction(request: web.Request) -> web.Response:
    prediction_id = request.match_info["prediction_id"]
    try:
        record = await request.app[JOBS].get(prediction_id)
    except JobStoreUnavailableError as exc:
        raise errors.unavailable(f"job store unavailable: {exc}") from exc
    if record is None:
        return json_response({"error": NOT_FOUND_MESSAGE}, status=404)
    # The version the job was accepted for, as every embedding answer says it.
    headers = {"X-Model": record.model} if record.model else None
    if record.status == "pending":
        return json_response({"error": PENDING_MESSAGE}, status=400, headers=headers)
    if record.status == "failed":
        cause = record.error or {}
        return json_response(
            {
                "error": f"Prediction failed: {cause.get('error', 'unknown error')}",
                "error_type": cause.get("error_type", ErrorType.BACKEND.value),
                "prediction_id": prediction_id,
                "status": "failed",
            },
            status=424,
            headers=headers,
        )
    output = {"input": record.input, "result": record.result}
    return json_response({"prediction_id": prediction_id, "output": output}, headers=headers)


def add_predict_routes(app: web.Application) -> None:
    app.router.add_post("/predict", predict)
    app.router.add_get("/predict/{prediction_id}", prediction)
