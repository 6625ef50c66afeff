"""The error envelope, and the one exception the API layer raises to answer with it.

Every error a client sees has the OpenAI shape
`{"error": {"message", "type", "param", "code"}}`; handlers raise `APIError` and
the app renders it, so no route builds an error body by hand.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from typing_extensions import TypedDict

# Pydantic error types that mean "wrong JSON type" rather than "wrong value".
_TYPE_ERRORS = frozenset(
    {
        "bool_type",
        "dict_type",
        "float_type",
        "int_type",
        "list_type",
        "model_type",
        "none_required",
        "string_type",
    }
)
# Codes our own validators raise (as PydanticCustomError types); passed through as-is.
_OWN_CODES = frozenset({"invalid_value", "invalid_type", "unsupported"})
# Where FastAPI says an input came from; not part of the field name a client sent.
_LOCATIONS = frozenset({"body", "query", "path", "header", "cookie"})


class _ErrorBody(TypedDict):
    message: str
    type: str
    param: str | None
    code: str | None


class Error(TypedDict):
    """The OpenAI error envelope; `param` names the offending field."""

    error: _ErrorBody


class APIError(Exception):
    """An HTTP error answer: raise it anywhere below a route."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def to_dict(self) -> Error:
        return error_body(self.message, self.type, self.param, self.code)

    # One constructor per status, so the type strings live only here.

    @classmethod
    def invalid(
        cls, message: str, param: str | None = None, code: str | None = "invalid_value"
    ) -> APIError:
        return cls(400, message, "invalid_request_error", param, code)

    @classmethod
    def unsupported(cls, param: str) -> APIError:
        return cls.invalid(f"`{param}` is not supported yet", param, "unsupported")

    @classmethod
    def context_length_exceeded(cls, message: str, param: str) -> APIError:
        return cls.invalid(message, param, "context_length_exceeded")

    @classmethod
    def unauthorized(cls) -> APIError:
        # Never echo the key back: it may be a real key meant for another service.
        return cls(
            401,
            "Incorrect or missing API key. Send it as `Authorization: Bearer <key>`.",
            "authentication_error",
            None,
            "invalid_api_key",
            {"WWW-Authenticate": "Bearer"},
        )

    @classmethod
    def model_not_found(cls, model: str) -> APIError:
        return cls(
            404,
            f"The model `{model}` does not exist.",
            "not_found_error",
            "model",
            "model_not_found",
        )

    @classmethod
    def not_found(cls, message: str = "Not found.") -> APIError:
        return cls(404, message, "not_found_error", None, "not_found")

    @classmethod
    def method_not_allowed(cls) -> APIError:
        return cls(405, "Method not allowed.", "invalid_request_error", None, "method_not_allowed")

    @classmethod
    def too_large(cls, limit: int) -> APIError:
        message = f"The request body is larger than the limit of {limit} bytes."
        return cls(413, message, "invalid_request_error", None, "request_too_large")

    @classmethod
    def overloaded(cls, retry_after_s: int = 1) -> APIError:
        return cls(
            429,
            "The server is busy; retry later.",
            "rate_limit_error",
            None,
            "queue_full",
            {"Retry-After": str(retry_after_s)},
        )

    @classmethod
    def internal(cls, message: str = "Internal server error.") -> APIError:
        # The message is fixed text: tracebacks and exception strings go to the log only.
        return cls(500, message, "internal_error", None, "internal_error")

    @classmethod
    def unavailable(cls, message: str = "The model is not ready; retry later.") -> APIError:
        return cls(503, message, "service_unavailable_error", None, "unavailable")


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> Error:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def from_validation_errors(errors: Sequence[Mapping[str, Any]]) -> APIError:
    """The 400 for a pydantic or FastAPI validation failure; reports the first error.

    `param` is the top-level field the client sent, which is what SDKs show.
    """
    if not errors:
        return APIError.invalid("Invalid request.", None)
    error = errors[0]
    loc = [part for part in error.get("loc", ()) if _is_path(part)] or [None]
    param = loc[0] if isinstance(loc[0], str) else None
    if param in _PATH_PARAMS:
        param = _dotted(loc)  # `messages[2].content`: which message, not just "messages"
    kind = str(error.get("type", ""))
    msg = str(error.get("msg", "invalid value"))
    if kind == "extra_forbidden":
        return APIError.invalid(
            f"Unrecognized request argument supplied: {param}", param, "unknown_parameter"
        )
    if kind == "missing":
        return APIError.invalid(
            f"Missing required parameter: '{param}'", param, "missing_required_parameter"
        )
    if kind in _OWN_CODES:
        return APIError.invalid(msg, param, kind)
    code = "invalid_type" if kind in _TYPE_ERRORS else "invalid_value"
    what = "type" if code == "invalid_type" else "value"
    return APIError.invalid(f"Invalid {what} for '{_dotted(loc)}': {msg}", param, code)


# Fields whose errors name the whole path in `param`: a list of objects, where the
# index is what the client needs.
_PATH_PARAMS = {"messages", "tools", "functions"}
# Basic type names pydantic puts into a location for each branch of a union.
_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "literal"}


def _is_path(part: Any) -> bool:
    """Whether a location part names a field or an index (not where the value came from,
    not a union branch such as `str` or `list[ContentPart]`)."""
    if isinstance(part, int):
        return True
    if not isinstance(part, str) or part in _LOCATIONS:
        return False
    return not (part in _UNION_TAGS or "[" in part or part[:1].isupper())


def _dotted(loc: Sequence[Any]) -> str:
    """`stop[1]`-style path of a nested field, for messages."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part is not None:
            text += f".{part}" if text else str(part)
    return text or "body"
