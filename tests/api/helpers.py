"""Shared by the API tests."""

from __future__ import annotations

from typing import Any

MODEL = "fake-model"


def assert_error(response: Any, status: int, param: str | None, code: str | None = None) -> dict:
    """The envelope's shape, and its param (and code when given)."""
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"]
    error = body["error"]
    assert list(error) == ["message", "type", "param", "code"]
    assert isinstance(error["message"], str) and error["message"]
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error
