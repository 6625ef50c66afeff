"""The one interface the API layer uses to reach an engine."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from fireside.engine.types import (
    EngineRequest,
    EngineStats,
    GrammarSpec,
    PromptImage,
    RequestOutput,
)
from fireside.runner.base import MediaPrompt, TokenizerInfo


class EngineClient(Protocol):
    """An engine as seen from asyncio code: submit, stream, abort, inspect."""

    @property
    def vocab_size(self) -> int:
        """Token ids are valid in [0, vocab_size)."""
        ...

    @property
    def context_length(self) -> int:
        """Most tokens (prompt plus output) one sequence may hold."""
        ...

    @property
    def is_healthy(self) -> bool:
        """False while loading and after the engine thread died."""
        ...

    def tokenize(
        self, text: str, add_special: bool = True, parse_special: bool = True
    ) -> list[int]:
        """Token ids of a prompt string; with `add_special`, the model's BOS if it uses
        one; with `parse_special` (the default), control-token text is the control
        token, else plain text (chat's `safe_tokenization`)."""
        ...

    def tokenizer_info(self) -> TokenizerInfo:
        """The tokenizer's special tokens and chat template."""
        ...

    def detokenize(self, token_ids: Sequence[int], special: bool = False) -> str:
        """Text of token ids (invalid UTF-8 replaced); with `special`, control tokens
        render as their text (`<|im_start|>`) instead of nothing."""
        ...

    def token_bytes(self, token_id: int, special: bool = False) -> bytes:
        """The bytes one token renders to (may be part of a multi-byte character);
        `special` as in detokenize."""
        ...

    @property
    def supports_images(self) -> bool:
        """The model has a vision projector."""
        ...

    def tokenize_media(
        self, text: str, images: Sequence[PromptImage]
    ) -> tuple[list[int], MediaPrompt]:
        """Token ids of a prompt with one `<image>` marker per image, and the media
        handle for `EngineRequest.media`. Image positions hold negative ids.
        Slow (image preprocessing): call it off the event loop. ValueError if it fails.
        """
        ...

    def compile_grammar(self, spec: GrammarSpec) -> str:
        """The grammar for `SamplingParams.grammar`, compiled and cached.

        Raises `GrammarError` (a ValueError) with the reason when it does not
        compile. May take a while for a large schema: call it off the event loop.
        """
        ...

    def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its outputs until one has `finished`.

        Leaving the iteration early (break, cancellation, client disconnect)
        aborts the request and frees its sequences within one engine step.
        """
        ...

    def abort(self, request_id: str) -> None:
        """Stop a request; safe to call for unknown or finished ids."""
        ...

    def stats(self) -> EngineStats:
        """A snapshot of the engine's counters."""
        ...
