"""OpenAI-style errors: every failure is ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status.

FastAPI answers validation problems with 422 and its own body; the handlers here turn them into the 400 answers the
OpenAI API (and so its clients' exception types) use, naming the offending field.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from bild.serve.schemas import MAX_BODY_BYTES

logger = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """An answer other than success, raised anywhere in a request handler."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param, "code": code}}


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error_body(error.status, error.message, error.param, error.code), error.status, error.headers)


def _field_name(location: tuple) -> str | None:
    """('body', 'messages', 0, 'content') -> 'messages[0].content'; the body itself -> None."""
    parts = [part for part in location if part != "body"]
    # Pydantic puts the union member it tried into the location ('stop', 'list[str]', 0); drop those labels.
    parts = [part for part in parts if not (isinstance(part, str) and ("[" in part or part in _UNION_LABELS))]
    name = ""
    for part in parts:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or None


_UNION_LABELS = {"str", "int", "float", "bool", "function-after", "constrained-str", "literal"}


def _validation_message(error: dict, param: str | None) -> str:
    kind = error.get("type", "")
    if kind == "json_invalid":
        return f"the request body is not valid JSON: {error.get('ctx', {}).get('error', 'parse error')}"
    if kind == "missing" and param:
        return f"missing required field {param!r}"
    if kind == "missing":
        return "the request body is missing; send a JSON object"
    if kind == "extra_forbidden":
        return f"unrecognized field {param!r}"
    where = f"field {param!r}: " if param else "request body: "
    if kind == "value_error":  # the schema's own checks: their message without pydantic's "Value error, " prefix
        return where + str(error.get("ctx", {}).get("error", error.get("msg")))
    return where + str(error.get("msg", "invalid value"))


def _not_a_json_object(request: Request) -> str:
    """Why a body that FastAPI did not read as a JSON object failed: most often the Content-Type header."""
    content_type = request.headers.get("content-type")
    if content_type is None or "json" not in content_type.lower():
        got = f"'Content-Type: {content_type}'" if content_type else "no Content-Type header"
        return f"the request body must be JSON sent with 'Content-Type: application/json'; this request has {got}"
    return "the request body must be a JSON object such as {\"model\": ..., \"prompt\": ...}"


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    # the schema's own messages say more than the type errors of a union's other members
    first = next((error for error in errors if error.get("type") == "value_error"), errors[0] if errors else {})
    if first.get("type") == "json_invalid":
        return error_response(APIError(400, _validation_message(first, None), code="invalid_json"))
    if tuple(first.get("loc", ())) == ("body",) and first.get("type") != "missing":
        return error_response(APIError(400, _not_a_json_object(request), code="invalid_json"))
    param = _field_name(tuple(first.get("loc", ())))
    # A union field (stop, prompt, content) fails once per alternative: say every alternative.
    same_field = [error for error in errors if _field_name(tuple(error.get("loc", ()))) == param]
    message = _validation_message(first, param)
    if len(same_field) > 1:
        message += "".join(f"; or {error.get('msg', 'invalid value')}" for error in same_field[1:])
    others = len({_field_name(tuple(error.get("loc", ()))) for error in errors} - {param})
    if others:
        message += f" (and problems with {others} other field{'s' if others > 1 else ''})"
    return error_response(APIError(400, message, param=param, code="invalid_value"))


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    status = exc.status_code if 400 <= exc.status_code < 600 else 400
    if status == 413:  # FastAPI's body limit, counted as the body arrives (with or without Content-Length)
        return error_response(body_too_large())
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    if status == 404:
        message = f"no route {request.url.path!r}; see GET /v1/models and the OpenAI API"
    return error_response(APIError(status, message, headers=dict(exc.headers or {})))


def body_too_large() -> APIError:
    """413; closing the connection stops a client that is still sending (else the server reads the rest to discard)."""
    message = f"the request body is larger than {MAX_BODY_BYTES // 2**20} MiB"
    return APIError(413, message, headers={"Connection": "close"})


async def _on_api_error(request: Request, exc: APIError) -> JSONResponse:
    return error_response(exc)


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error while serving %s %s", request.method, request.url.path)
    return error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}"))


def install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(Exception, _on_unexpected)
