"""Errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with the right status.

Anything a client sends gets a 4xx with a message that states the rule, the bad value and a valid
one; a 5xx means the server itself failed (a replica died), never the request.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

# OpenAI's error types by status.
TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_response(
    status: int, message: str, *, param: str | None = None, code: str | None = None, headers: dict | None = None
) -> JSONResponse:
    body = {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}  # fmt: skip
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_message(error: dict) -> tuple[str, str | None]:
    location = [str(part) for part in error.get("loc", ()) if part not in ("body", "query", "path")]
    param = ".".join(location) or None
    kind, value = error.get("type"), error.get("input")
    if kind == "extra_forbidden":
        return f"`{param}` is not a parameter of this endpoint (GET /openapi.json lists the ones it takes).", param
    if kind == "missing":
        return f"`{param}` is required.", param
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    rule = error.get("msg", "invalid value")
    rule = rule[0].lower() + rule[1:] if rule else rule
    return (f"Invalid `{param}`: {rule}; got {shown}." if param else f"Invalid request: {rule}."), param


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return error_response(error.status, error.message, param=error.param, code=error.code, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = error.errors()
        message, param = _validation_message(problems[0]) if problems else ("Invalid request.", None)
        if len(problems) > 1:
            message += f" ({len(problems) - 1} more problem(s) in this request.)"
        return error_response(400, message, param=param, code="invalid_value")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        detail = error.detail if isinstance(error.detail, str) else str(error.detail)
        if error.status_code == 404:
            detail = f"No route {request.method} {request.url.path}; the API is under /v1 (see GET /docs)."
        elif error.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}."
        return error_response(error.status_code, detail, headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception) -> JSONResponse:
        return error_response(500, f"The server failed: {type(error).__name__}: {error}")
