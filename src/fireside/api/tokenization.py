"""The tokenizer endpoints: `GET /tokenizer_info`, `POST /tokenize`, `POST /detokenize`.

In vLLM's shapes, so that clients written for vLLM work unchanged: lm-evaluation-
harness's `local-completions` model finds them at the server root (it strips
`/v1/completions` from its `base_url`) and then tokenizes through the server
instead of downloading a Hugging Face tokenizer. The same routes are served
under `/v1` and `/inference/v1`.

- `tokenizer_info`: the model's tokenizer_config.json, as far as a GGUF file
  holds one: the special tokens' text, whether tokenizing adds BOS/EOS, the
  context length and the chat template (only when the model has one).
- `tokenize`: `{"prompt": str, "add_special_tokens": bool = true,
  "return_token_strs": bool = false}` -> `{"count", "max_model_len", "tokens",
  "token_strs"}`. Special tokens written in the text (`<|im_start|>`) are parsed
  either way, as Hugging Face tokenizers do; `add_special_tokens` only adds BOS
  (EOS) when the model asks for it. The ids are the ones a completion of the
  same string prompt would use.
- `detokenize`: `{"tokens": [int]}` -> `{"prompt": str}`, special tokens written
  out as their text.

`model` is optional when one model is served (or one model and its aliases).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fireside.api.errors import APIError, from_validation_errors
from fireside.api.prompts import TOKENIZE_IN_THREAD_CHARS
from fireside.engine.client import EngineClient

_Body = TypeVar("_Body", bound=BaseModel)

# vLLM's TokenizerInfoResponse requires a class name; this one says what tokenizes.
TOKENIZER_CLASS = "LlamaCppTokenizer"


class TokenizeRequest(BaseModel):
    """The body of `POST /tokenize`. Null means "not given", as in completions."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    prompt: str
    add_special_tokens: bool | None = True
    return_token_strs: bool | None = False


class DetokenizeRequest(BaseModel):
    """The body of `POST /detokenize`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


class TokenizerService:
    """The tokenizer endpoints, minus HTTP. `engines` maps every served id (aliases
    too) to its engine."""

    def __init__(self, engines: Mapping[str, EngineClient]) -> None:
        self.engines = dict(engines)

    def engine(self, model: str | None) -> EngineClient:
        if model is not None:
            engine = self.engines.get(model)
            if engine is None:
                raise APIError.model_not_found(model)
            return engine
        distinct = {id(e): e for e in self.engines.values()}
        if len(distinct) == 1:
            return next(iter(distinct.values()))
        raise APIError.invalid(
            f"{len(distinct)} models are served: name one in `model`",
            "model",
            "missing_required_parameter",
        )

    def info(self, model: str | None) -> dict[str, Any]:
        engine = self.engine(model)
        tokenizer = engine.tokenizer_info()
        body: dict[str, Any] = {
            "tokenizer_class": TOKENIZER_CLASS,
            "bos_token": tokenizer.bos_token,
            "eos_token": tokenizer.eos_token,
            "pad_token": tokenizer.pad_token,
            "add_bos_token": tokenizer.add_bos_token,
            "add_eos_token": tokenizer.add_eos_token,
            "model_max_length": engine.context_length,
        }
        if tokenizer.chat_template:  # as vLLM: left out when there is none
            body["chat_template"] = tokenizer.chat_template
        return body

    async def tokenize(self, body: bytes) -> dict[str, Any]:
        request = _parse(TokenizeRequest, body)
        engine = self.engine(request.model)
        add_special = request.add_special_tokens is not False
        if len(request.prompt) > TOKENIZE_IN_THREAD_CHARS:
            tokens = await asyncio.to_thread(engine.tokenize, request.prompt, add_special)
        else:
            tokens = engine.tokenize(request.prompt, add_special)
        token_strs = None
        if request.return_token_strs:
            token_strs = [
                engine.token_bytes(t, special=True).decode("utf-8", "replace") for t in tokens
            ]
        return {
            "count": len(tokens),
            "max_model_len": engine.context_length,
            "tokens": tokens,
            "token_strs": token_strs,
        }

    def detokenize(self, body: bytes) -> dict[str, Any]:
        request = _parse(DetokenizeRequest, body)
        engine = self.engine(request.model)
        for position, token in enumerate(request.tokens):
            if token >= engine.vocab_size:
                raise APIError.invalid(
                    f"token id {token} at position {position} is out of range "
                    f"[0, {engine.vocab_size})",
                    "tokens",
                )
        # Joining token bytes is fast at any length the body limit allows.
        return {"prompt": engine.detokenize(request.tokens, special=True)}


def _parse(model: type[_Body], body: bytes) -> _Body:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise APIError.invalid(
            "The request body is not valid JSON.", None, "invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise APIError.invalid("The request body must be a JSON object.", None, "invalid_type")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_validation_errors(exc.errors(include_url=False)) from None
