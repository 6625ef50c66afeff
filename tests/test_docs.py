"""docs/api.md, the API contract, names every field a client may send."""

from __future__ import annotations

from pathlib import Path

import pytest

from fireside.api.chat_protocol import ChatCompletionRequest
from fireside.api.protocol import CompletionRequest
from fireside.api.tokenization import DetokenizeRequest, TokenizeRequest

API_DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


@pytest.mark.parametrize(
    "model", [CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest]
)
def test_every_request_field_is_documented(model):
    text = API_DOC.read_text()
    missing = [name for name in model.model_fields if f"`{name}`" not in text]
    assert not missing, f"docs/api.md does not describe {model.__name__} fields {missing}"
