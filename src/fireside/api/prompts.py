"""Prompts into checked token ids: tokenizing, vocabulary range, context fitting."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from fireside.api.errors import APIError
from fireside.engine.client import EngineClient

# Tokenizing is fast, but a long prompt would still stall every other request on
# the event loop; past this many characters it runs in a worker thread.
TOKENIZE_IN_THREAD_CHARS = 10_000


async def tokenize_prompts(
    engine: EngineClient, prompt: str | list[str] | list[int] | list[list[int]]
) -> list[tuple[list[int], str | None]]:
    """(token ids, original text or None) per prompt, in order."""
    if isinstance(prompt, str):
        texts = [prompt]
    elif isinstance(prompt[0], str):
        texts = prompt
    elif isinstance(prompt[0], int):
        return [(list(prompt), None)]
    else:
        return [(list(ids), None) for ids in prompt]

    def tokenize_all() -> list[list[int]]:
        return [engine.tokenize(text) for text in texts]

    if sum(len(text) for text in texts) > TOKENIZE_IN_THREAD_CHARS:
        token_lists = await asyncio.to_thread(tokenize_all)
    else:
        token_lists = tokenize_all()
    return list(zip(token_lists, texts, strict=True))


def check_token_ids(token_ids: Sequence[int], vocab_size: int, prompt_index: int) -> None:
    if not token_ids:
        raise APIError.invalid("prompt must not be empty", "prompt")
    for position, token_id in enumerate(token_ids):
        if not 0 <= token_id < vocab_size:
            raise APIError.invalid(
                f"token id {token_id} at position {position} of prompt {prompt_index} "
                f"is out of range [0, {vocab_size})",
                "prompt",
            )


def check_logit_bias(logit_bias: Sequence[tuple[int, float]], vocab_size: int) -> None:
    for token_id, _ in logit_bias:
        if token_id >= vocab_size:
            raise APIError.invalid(
                f"logit_bias token id {token_id} is out of range [0, {vocab_size})",
                "logit_bias",
            )


def fit_to_context(
    num_prompt_tokens: int, max_tokens: int, context_length: int, truncate: bool
) -> int:
    """The max_tokens this prompt can have, or a 400 when it cannot fit."""
    # A prompt that fills the context leaves no room for a token; it is still
    # fine for scoring (max_tokens 0 with echo), which generates nothing.
    fills = num_prompt_tokens > context_length or (
        num_prompt_tokens == context_length and max_tokens > 0
    )
    if fills:
        raise APIError.context_length_exceeded(
            f"This model's maximum context length is {context_length} tokens, "
            f"but the prompt has {num_prompt_tokens} tokens.",
            "prompt",
        )
    room = context_length - num_prompt_tokens
    if max_tokens <= room:
        return max_tokens
    if truncate:
        return room
    raise APIError.context_length_exceeded(
        f"This model's maximum context length is {context_length} tokens; the prompt has "
        f"{num_prompt_tokens} tokens and max_tokens is {max_tokens}. Lower max_tokens or use "
        '"context_length_exceeded_behavior": "truncate".',
        "max_tokens",
    )


async def draft_token_ids(
    engine: EngineClient, draft: str | list[int] | None, param: str
) -> tuple[int, ...]:
    """`speculation` or `prediction` as token ids: text is tokenized as output is, with
    no BOS; ids must be in the vocabulary (400 naming `param`)."""
    if draft is None or not draft:
        return ()
    if isinstance(draft, str):
        text = draft
        if len(text) > TOKENIZE_IN_THREAD_CHARS:
            return tuple(await asyncio.to_thread(engine.tokenize, text, False))
        return tuple(engine.tokenize(text, add_special=False))
    for position, token_id in enumerate(draft):
        if not 0 <= token_id < engine.vocab_size:
            raise APIError.invalid(
                f"token id {token_id} at position {position} of {param} is out of range "
                f"[0, {engine.vocab_size})",
                param,
            )
    return tuple(draft)
