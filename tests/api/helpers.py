"""Shared by the API tests."""

from __future__ import annotations

import json
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


def complete(client: Any, **fields: Any) -> dict:
    """A successful non-streamed completion's body."""
    response = client.post("/v1/completions", json={"model": MODEL, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def stream_chunks(client: Any, **fields: Any) -> list[dict]:
    """A stream's data chunks, checked to end with [DONE] (which is left out)."""
    body = {"model": MODEL, "stream": True, **fields}
    with client.stream("POST", "/v1/completions", json=body) as response:
        text = "".join(response.iter_text())
    events = [e.removeprefix("data: ") for e in text.split("\n\n")[:-1]]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]
