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
from proxy.errors import ErrorType
from proxy.http.common import json_response
from proxy.http.keys import JOBS, SERVICE, SETTINGS
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


def _parse(body: Any) -> str:
    if type(body) is dict and len(body) == 1 and type(body.get("input")) is str and body["input"]:
        return str(body["input"])  # the common body: nothing else to validate
    require_object(body, "input")
    return validate(PredictRequest, body).input


def _is_async(request: web.Request) -> bool:
    return request.headers.get("Async-Mode", "").strip().lower() in ("true", "1", "yes")


async def predict(request: web.Request) -> web.Response:
    body = await read_json(request)
    text = _parse(body)
    service = request.app[SERVICE]
    if _is_async(request):
        # Jobs run later, with no request to answer: `before` hooks run now, on what is
        # queued; `after` hooks and capture are for synchronous answers only.
        obs = request[OBSERVATION]
        obs.model = service.name
        (job_text,), _ = await before_hooks(request, obs, [text], None)
        assert isinstance(job_text, str)  # hooks keep each input's kind of item
        # The same checks as the synchronous path, so a job never fails for its input later.
        service.validate([job_text], EmbedOptions())
        jobs = request.app[JOBS]
        if jobs.kind == "memory" and request.app[SETTINGS].workers > 1:
            # Each worker has its own memory store: a poll reaching another worker would
            # answer 404 for a job that exists. Refuse rather than lose track of jobs.
            raise errors.unavailable(
                "async jobs with WORKERS > 1 need JOB_STORE=redis://...: the memory store "
                "is per worker process"
            )
        try:
            prediction_id = await jobs.submit(job_text)
        except JobQueueFullError as exc:
            raise errors.overloaded() from exc
        except JobStoreUnavailableError as exc:
            raise errors.unavailable(f"job store unavailable: {exc}") from exc
        return json_response(
            {"message": ACCEPTED_MESSAGE, "prediction_id": prediction_id}, status=202
        )
    _, vectors = await embed_request(request, service, [text], EmbedOptions())
    return json_response({"input": text, "result": vectors[0]})


async def prediction(request: web.Request) -> web.Response:
    prediction_id = request.match_info["prediction_id"]
    try:
        record = await request.app[JOBS].get(prediction_id)
    except JobStoreUnavailableError as exc:
        raise errors.unavailable(f"job store unavailable: {exc}") from exc
    if record is None:
        return json_response({"error": NOT_FOUND_MESSAGE}, status=404)
    if record.status == "pending":
        return json_response({"error": PENDING_MESSAGE}, status=400)
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
        )
    return json_response(
        {"prediction_id": prediction_id, "output": {"input": record.input, "result": record.result}}
    )


def add_predict_routes(app: web.Application) -> None:
    app.router.add_post("/predict", predict)
    app.router.add_get("/predict/{prediction_id}", prediction)
