"""Errors in TEI's shape: ``{"error": ..., "error_type": ...}`` with TEI's status codes."""

from __future__ import annotations

from enum import StrEnum
from http import HTTPStatus
from typing import Any


class ErrorType(StrEnum):
    # TEI's own variants (router/src/lib.rs `ErrorType`), capitalised as on the wire.
    UNHEALTHY = "Unhealthy"
    BACKEND = "Backend"
    OVERLOADED = "Overloaded"
    VALIDATION = "Validation"
    TOKENIZER = "Tokenizer"
    EMPTY = "Empty"
    # The proxy's own, for faults TEI itself never reports.
    TIMEOUT = "Timeout"
    UPSTREAM = "Upstream"
    NOT_FOUND = "NotFound"
    CONFLICT = "Conflict"


EMPTY_INPUT_MESSAGE = "Input validation error: `inputs` cannot be empty"


class ApiError(Exception):
    """An error a caller sees: an HTTP status, a message and TEI's ``error_type``.

    ``from_upstream`` marks errors the upstream itself answered for a batch; the service uses
    it to tell "this batch holds a bad item" (worth splitting) from faults of the transport.
    Errors the proxy raises on the upstream's behalf (unreachable, timed out, malformed or
    refused answers) are 502, 503 or 504 without it; see :func:`proxy.resilience.classify`.
    """

    def __init__(
        self,
        status: int,
        message: str,
        error_type: ErrorType | str,
        *,
        headers: dict[str, str] | None = None,
        from_upstream: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = str(error_type)
        self.headers = headers or {}
        self.from_upstream = from_upstream

    def tei_body(self) -> dict[str, Any]:
        return {"error": self.message, "error_type": self.error_type}

    def openai_body(self) -> dict[str, Any]:
        # TEI's OpenAICompatErrorResponse: `type` on the wire, `code` is the HTTP status.
        return {"message": self.message, "code": self.status, "type": self.error_type}

    def __repr__(self) -> str:
        return f"ApiError({self.status}, {self.message!r}, {self.error_type!r})"


class ModelNotFoundError(ApiError):
    """A model (or name@version) the registry does not route to. On the OpenAI routes it is
    answered in OpenAI's own body, whose ``code`` the openai SDK exposes as ``model_not_found``."""

    def __init__(self, model: str, detail: str = "") -> None:
        super().__init__(404, f"model `{model}` not found{detail}", ErrorType.NOT_FOUND)
        self.model = model

    def openai_body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": f"The model `{self.model}` does not exist.",
                "type": "invalid_request_error",
                "param": "model",
                "code": "model_not_found",
            }
        }


def empty_input() -> ApiError:
    return ApiError(400, EMPTY_INPUT_MESSAGE, ErrorType.EMPTY)


def validation(message: str) -> ApiError:
    return ApiError(422, message, ErrorType.VALIDATION)


def batch_too_large(size: int, maximum: int) -> ApiError:
    return validation(f"batch size {size} > maximum allowed batch size {maximum}")


def overloaded(retry_after_s: float = 1.0) -> ApiError:
    return ApiError(
        429,
        "Model is overloaded",
        ErrorType.OVERLOADED,
        headers={"Retry-After": str(max(1, round(retry_after_s)))},
    )


def unavailable(message: str) -> ApiError:
    return ApiError(503, message, ErrorType.UNHEALTHY)


def timeout(message: str = "Request timed out") -> ApiError:
    return ApiError(504, message, ErrorType.TIMEOUT)


def bad_upstream(message: str) -> ApiError:
    return ApiError(502, message, ErrorType.UPSTREAM)


# What to check when the upstream refuses the proxy itself rather than the input.
_REFUSAL_HINTS = {
    401: "check UPSTREAM_API_KEY",
    403: "check UPSTREAM_API_KEY",
    404: "check UPSTREAM_URL and UPSTREAM_KIND",
    405: "check UPSTREAM_URL and UPSTREAM_KIND",
}
REFUSAL_STATUSES = frozenset(_REFUSAL_HINTS)


def upstream_refused(status: int, detail: str = "") -> ApiError:
    """The upstream refused the proxy's credentials or route (401, 403, 404, 405).

    That is the operator's problem, not the caller's: passing the 401 on would blame the
    caller's own key. A 502 names the upstream's answer and counts toward the breaker.
    """
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "error"
    hint = _REFUSAL_HINTS.get(status, "check the upstream settings")
    detail = f" ({detail})" if detail else ""
    return bad_upstream(f"upstream refused the call: {status} {phrase}{detail}; {hint}")
