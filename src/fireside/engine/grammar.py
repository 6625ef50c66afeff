"""Constrained decoding with llguidance: grammars compiled once, masks per step.

`Grammars` owns the model's llguidance tokenizer (built once, ~0.2 s) and an LRU
cache of compiled grammars: a request with a schema seen before gets a copy of
an already-built matcher. Each constrained sample holds its own matcher; every
step, the masks of all constrained rows are computed together on llguidance's
thread pool, then applied to the logits in numpy.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import llguidance
import numpy as np
import numpy.typing as npt
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask_par

from fireside.engine.types import GrammarError, GrammarSpec

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

# JSON is written compactly but readably, as json.dumps does; no other whitespace
# is allowed, or small models pad with it forever.
_JSON_OPTIONS: JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
_CACHE_SIZE = 64


class Grammars:
    def __init__(
        self,
        make_tokenizer: Callable[[], llguidance.LLTokenizer | None],
        num_threads: int,
        cache_size: int = _CACHE_SIZE,
    ) -> None:
        self._make_tokenizer = make_tokenizer  # None: the model cannot constrain output
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._num_threads = num_threads
        self._executor: llguidance.LLExecutor | None = None  # made at the first mask
        self._cache: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()  # compile runs on the API side, matchers on the engine's
        self.num_masks = 0
        self.mask_seconds = 0.0

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        """Built on first use; GrammarError when the model has none."""
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = self._make_tokenizer()
            if self._tokenizer is None:
                raise GrammarError("this model does not support constrained output")
            return self._tokenizer

    def compile(self, spec: GrammarSpec) -> str:
        """The llguidance grammar for a spec, compiled and cached; raises GrammarError."""
        grammar = _to_llguidance(spec)
        self._template(grammar)
        return grammar

    def matcher(self, grammar: str) -> llguidance.LLMatcher:
        """A fresh matcher for one sequence (a copy of the cached compiled one)."""
        return self._template(grammar).deep_copy()

    def _template(self, grammar: str) -> llguidance.LLMatcher:
        with self._lock:
            template = self._cache.get(grammar)
            if template is not None:
                self._cache.move_to_end(grammar)
                return template
        tokenizer = self.tokenizer
        template = llguidance.LLMatcher(tokenizer, grammar, log_level=0)  # drops the GIL
        if template.is_error():
            raise GrammarError(_short(template.get_error()))
        with self._lock:
            self._cache[grammar] = template
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return template

    def mask(self, rows: npt.NDArray[np.float32], matchers: Sequence[llguidance.LLMatcher]) -> None:
        """Set every token a row's matcher forbids to -inf, in place (rows[i] <-> matchers[i])."""
        started = time.perf_counter()
        vocab = rows.shape[1]
        bitmask = allocate_token_bitmask(len(matchers), vocab)
        targets = [(m, i) for i, m in enumerate(matchers)]
        if self._executor is None:
            self._executor = llguidance.LLExecutor(self._num_threads)
        fill_next_token_bitmask_par(self._executor, targets, bitmask)
        allowed = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :vocab]
        for i in range(len(matchers)):
            row = rows[i]
            if not allowed[i].any():
                # A matcher that allows nothing is in error; let the row end cleanly.
                allowed[i, self.tokenizer.eos_token] = 1
            row[allowed[i] == 0] = -np.inf
        self.num_masks += len(matchers)
        self.mask_seconds += time.perf_counter() - started


def consume(matcher: llguidance.LLMatcher, token: int) -> bool:
    """Feed a sampled token to a sample's matcher; False once the grammar is done.

    A matcher in error (it cannot happen with the mask applied, but a grammar bug
    must not loop forever) ends the sample too.
    """
    matcher.consume_token(token)
    return not (matcher.is_stopped() or matcher.is_error())


def _to_llguidance(spec: GrammarSpec) -> str:
    try:
        if spec.kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(
                spec.source, defaults=_JSON_OPTIONS
            )
        if spec.kind == "gbnf":
            return llguidance.grammar_from("gbnf", spec.source)
        if spec.kind == "lark":
            return llguidance.LLMatcher.grammar_from_lark(spec.source)
    except (ValueError, json.JSONDecodeError) as exc:
        raise GrammarError(_short(str(exc))) from None
    raise GrammarError(f"unknown grammar kind {spec.kind!r}")


def _short(message: str, limit: int = 500) -> str:
    message = " ".join(message.split())
    return message if len(message) <= limit else message[: limit - 3] + "..."
