"""The narrow interface the engine needs from a model: `Runner`, and `Media` for images.

Nothing here imports llama.cpp: `runner.llamacpp` and `runner.media` implement
these protocols on it, and the engine sees only what is declared here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import llguidance


@dataclass
class Batch:
    """Tokens for one forward call; every token belongs to exactly one sequence.

    `want_logits[i]` asks for the logits after token i; `forward` returns one
    row per such token, in batch order.
    """

    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    seq_ids: list[int] = field(default_factory=list)
    want_logits: list[bool] = field(default_factory=list)

    def add(self, token: int, position: int, seq_id: int, want_logits: bool) -> None:
        self.tokens.append(token)
        self.positions.append(position)
        self.seq_ids.append(seq_id)
        self.want_logits.append(want_logits)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_logits(self) -> int:
        return sum(self.want_logits)


@dataclass(frozen=True)
class TokenizerInfo:
    """The tokenizer's special tokens and chat template, named as Hugging Face's
    tokenizer_config.json names them (for clients that tokenize through the server)."""

    bos_token: str | None  # the token's text; None when the model has none
    eos_token: str | None
    pad_token: str | None
    add_bos_token: bool  # tokenizing with special tokens adds BOS
    add_eos_token: bool
    chat_template: str | None  # Jinja, from the model file; None when it has none


class LoadError(RuntimeError):
    """A model or its context could not be set up: a start-up error, said plainly."""


class KVCacheFull(Exception):
    """The KV cache had no room for the batch; nothing was computed."""


@dataclass
class ImageSpan:
    """One image of a tokenized prompt: the positions it fills, computed whole."""

    start: int  # first position of the image in the prompt
    num_pos: int  # positions it occupies
    num_tokens: int  # embeddings it produces
    # The runner's own handle to compute it, opaque above the runner (runner.media:
    # an owned mtmd input chunk); None once `MediaPrompt.close` freed it.
    chunk: Any


class MediaPrompt(Protocol):
    """A prompt with images as `Media.tokenize` made it; the engine keeps it in
    `EngineRequest.media` until the request ends."""

    @property
    def token_ids(self) -> list[int]:
        """The prompt's tokens; image positions hold negative placeholder ids."""
        ...

    @property
    def spans(self) -> Sequence[ImageSpan]:
        """The images, in prompt order."""
        ...

    def close(self) -> None:
        """Free the images' chunks (their KV, if cached, stays). Safe to call twice."""
        ...


class Media(Protocol):
    """A model's vision projector: prompts with images in, image KV into a sequence."""

    def tokenize(
        self, text: str, images: Sequence[npt.NDArray[np.uint8]], digests: Sequence[bytes]
    ) -> MediaPrompt:
        """Text with one `<image>` marker per image (RGB uint8 [height, width, 3], with
        its bytes' sha256) to a prompt. Slow: image preprocessing. Any thread.
        ValueError when the images or the text cannot be tokenized."""
        ...

    def evaluate(
        self, span: ImageSpan, seq_id: int, want_logits: bool
    ) -> npt.NDArray[np.float32] | None:
        """Encode one image of a prompt this Media tokenized and decode its embeddings
        into `seq_id` at `span.start`. Engine thread only. Returns the logits after its
        last position when asked (a prompt that ends with an image picks its first
        token from them), a copy that later calls leave alone."""
        ...


class Runner(Protocol):
    """A loaded model with one context holding several sequences.

    `forward`, `seq_remove` and `seq_copy` run on the engine thread only; the
    tokenizer's methods run on any thread.
    """

    vocab_size: int
    n_ctx: int  # KV cells in all
    # True: one pool of n_ctx cells all sequences share (`seq_copy` shares cells);
    # False: each sequence id has its own stream of n_ctx_seq cells (`seq_copy` copies).
    kv_unified: bool
    n_ctx_seq: int  # most cells one sequence may hold (n_ctx when unified)
    n_ctx_train: int
    n_batch: int  # most tokens one forward call accepts
    n_seq_max: int  # sequence ids are in [0, n_seq_max)
    add_bos: bool
    n_threads: int  # compute threads; the grammar masks use as many

    @property
    def media(self) -> Media | None:
        """The vision projector, when the model takes images."""
        ...

    def grammar_tokenizer(self) -> llguidance.LLTokenizer | None:
        """llguidance's tokenizer for this vocabulary, for constrained output (built on
        the first constrained request, so it may be slow); None when there is none."""
        ...

    def tokenize(
        self, text: str, add_special: bool = True, parse_special: bool = True
    ) -> list[int]:
        """Token ids of text; with `add_special`, BOS (and EOS) added if the model uses
        them; with `parse_special`, control-token text (`<|im_start|>`) is that token,
        else plain text."""
        ...

    def tokenizer_info(self) -> TokenizerInfo:
        """Special tokens and chat template (read on demand: nothing in a step needs it)."""
        ...

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        """The bytes a token renders to: in generated text control tokens render empty;
        with `special` (an echoed prompt) they render as their text, e.g. `<|im_start|>`."""
        ...

    def is_eog(self, token: int) -> bool:
        """True for end-of-generation tokens."""
        ...

    def forward(self, batch: Batch) -> npt.NDArray[np.float32]:
        """Run the batch; return float32 logits, one row per token that asked for them.

        The array may be a view of the runner's own buffer, valid until the next
        call: read or copy what you need before calling again.

        Raises KVCacheFull when the cache has no room (nothing computed), and
        ValueError for a batch the context cannot take (checked before llama.cpp,
        which aborts the process on an oversized batch).
        """
        ...

    def seq_remove(self, seq_id: int, start: int = 0, end: int = -1) -> None:
        """Drop a sequence's cells in [start, end); end -1 means to the end."""
        ...

    def seq_copy(self, src: int, dst: int, start: int, end: int) -> None:
        """Make dst share src's cells in [start, end) (metadata only in a unified cache)."""
        ...

    def detokenize(self, token_ids: Sequence[int], special: bool = False) -> str:
        """Text of a token list, invalid UTF-8 replaced; `special` as in token_bytes."""
        ...
