"""The tokenizer endpoints: `GET /tokenizer_info`, `POST /tokenize`, `POST /detokenize`.

In vLLM's shapes, so that clients written for vLLM work unchanged: lm-evaluation-
harness's `local-completions` model finds them at the server root (it strips
`/v1/completions` from its `base_url`) and then tokenizes through the server
instead of downloading a Hugging Face tokenizer. The same routes are served
under `/inference`, `/v1` and `/inference/v1`.

The bodies are the models and TypedDicts below, which `/openapi.json` is
generated from. Special tokens written in a prompt (`<|im_start|>`) are parsed
whatever `add_special_tokens` says, as Hugging Face tokenizers do, and
`detokenize` writes them out as their text. `model` is optional when one model
is served (or one model and its aliases).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Annotated, NotRequired

from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import TypedDict

from fireside.api.errors import APIError
from fireside.api.prompts import TOKENIZE_IN_THREAD_CHARS
from fireside.api.protocol import parse_body
from fireside.api.scalars import Count, PositiveCount, TokenId
from fireside.engine.client import EngineClient

# vLLM's TokenizerInfoResponse requires a class name; this one says what tokenizes.
TOKENIZER_CLASS = "LlamaCppTokenizer"


_MODEL_DESCRIPTION = "The id of a served model; needed only when several models are served."


class TokenizeRequest(BaseModel):
    """`add_special_tokens` adds the model's BOS/EOS when it uses them; special tokens
    written in the prompt are parsed either way. The ids are those a completion of
    the same string prompt uses. Null means "not given", as in completions."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(None, description=_MODEL_DESCRIPTION)
    prompt: str = Field(description="The text to tokenize.")
    add_special_tokens: bool | None = Field(
        True, description="Add the model's BOS (EOS) token when the model uses one."
    )
    return_token_strs: bool | None = Field(
        False, description="Add `token_strs`, each token's text."
    )


class DetokenizeRequest(BaseModel):
    """Token ids must be below the model's vocabulary size."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(None, description=_MODEL_DESCRIPTION)
    tokens: list[Annotated[int, Field(ge=0)]] = Field(
        description="The token ids to turn into text."
    )


class TokenizerInfo(TypedDict):
    """The model's tokenizer_config.json as far as its GGUF file holds one (vLLM's
    shape): the special tokens' text (null when the model has none), whether
    tokenizing with special tokens adds BOS/EOS, the context length, and the chat
    template (left out when the model has none)."""

    tokenizer_class: str
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    add_bos_token: bool
    add_eos_token: bool
    model_max_length: PositiveCount
    chat_template: NotRequired[str]


class TokenizeResponse(TypedDict):
    """The prompt's token ids; `token_strs` (each token's text) when asked."""

    count: Count
    max_model_len: PositiveCount
    tokens: list[TokenId]
    token_strs: list[str] | None


class DetokenizeResponse(TypedDict):
    """The tokens' text, special tokens written out (`<|im_start|>`)."""

    prompt: str


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

    def info(self, model: str | None) -> TokenizerInfo:
        engine = self.engine(model)
        tokenizer = engine.tokenizer_info()
        body: TokenizerInfo = {
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

    async def tokenize(self, body: bytes) -> TokenizeResponse:
        request = parse_body(TokenizeRequest, body)
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

    def detokenize(self, body: bytes) -> DetokenizeResponse:
        request = parse_body(DetokenizeRequest, body)
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
