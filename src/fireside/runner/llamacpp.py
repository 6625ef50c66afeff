"""The runner on llama.cpp's C API, through llama-cpp-python's low-level bindings.

One model, one context, `n_seq_max` sequences: each with a stream of KV cells of its
own (`seq_copy` copies a whole stream), or, with `kv_unified`, all in one pool
(`seq_copy` shares cells). Implements `runner.base.Runner`.
Only the runner package (this module, `media.py`, `weights.py`) imports llama_cpp.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import llama_cpp
import numpy as np
import numpy.typing as npt

from fireside.runner.base import Batch, KVCacheFull, LoadError, TokenizerInfo
from fireside.runner.media import MtmdMedia

if TYPE_CHECKING:
    import llguidance

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LlamaCppConfig:
    """The server settings have no defaults here: `server.py` fills them from
    `config.ServeConfig`, the one place they live."""

    model_path: str
    n_ctx: int  # KV cells in all; `--ctx-size`
    n_batch: int  # `--batch-size`
    n_seq_max: int  # sequence ids: running samples plus cached prefixes
    n_threads: int  # 0: the cores this process may use; `--threads`
    flash_attn: bool  # `--flash-attn`
    mmproj_path: str | None  # a vision projector (libmtmd): the model accepts images
    n_gpu_layers: int  # `--gpu-layers`: -1 all, 0 none (a CPU-only build has no GPU)
    # `--kv-unified`: one KV pool for all sequences, forks (n > 1, the prefix cache)
    # share cells for free, but every row's attention walks every sequence's cells.
    # False gives each sequence its own stream of n_ctx / n_seq_max cells (rounded up
    # to 256), starting at cell 0 whatever the others hold; forks copy whole streams.
    kv_unified: bool
    # Not a server setting: llama.cpp's own log.
    verbose: bool = False


def context_shape(config: LlamaCppConfig) -> tuple[int, int]:
    """The n_ctx and n_batch to ask llama.cpp for, so that it never aborts.

    llama.cpp reserves outputs for at least one row per sequence id and asserts
    that its batch (n_batch, cut to n_ctx) holds them: with 160 sequence ids,
    `--ctx-size 150` or `--batch-size 128` aborted the process. The batch
    llama.cpp allocates is therefore at least n_seq_max (the scheduler still
    sends at most `--batch-size` tokens a step), and so is the context. llama.cpp
    rounds the context up to a multiple of 256 cells but cuts the batch to the
    context asked for, so the rounding is done here, first. The caller reports
    any change from what was asked (`LlamaCppRunner.n_ctx`).
    """
    n_batch = max(config.n_batch, config.n_seq_max)
    n_ctx = -(-max(config.n_ctx, config.n_seq_max) // _KV_PAD) * _KV_PAD
    if not config.kv_unified:
        # Each stream gets n_ctx / n_seq_max cells, which llama.cpp rounds up to 256.
        n_ctx = -(-(n_ctx // config.n_seq_max) // _KV_PAD) * _KV_PAD * config.n_seq_max
    return n_ctx, min(n_batch, n_ctx)


_KV_PAD = 256  # llama.cpp allocates KV cells in multiples of this


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


_GGML_LOG_LEVEL_ERROR = 3
_backend_ready = False


def init_backend(verbose: bool = False) -> None:
    """Start llama.cpp once per process (quiet unless verbose)."""
    global _backend_ready
    if _backend_ready:
        return
    if not verbose:
        # llama.cpp prints every tensor it loads to stderr; keep errors only.
        _silence_llama_logs()
    llama_cpp.llama_backend_init()
    _backend_ready = True


def load_vocab_only(path: str) -> llama_cpp.llama_model_p | None:
    """A model file's vocabulary and metadata, no weights (llama.cpp's `vocab_only`);
    None if llama.cpp cannot read it. The caller frees it (`llama_model_free`)."""
    init_backend()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    return llama_cpp.llama_model_load_from_file(path.encode(), params) or None


def _quiet_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    if level == _GGML_LOG_LEVEL_ERROR:
        sys.stderr.write(text.decode("utf-8", "replace"))


# The ctypes callback llama.cpp calls; module-level, so it lives as long as the process.
_quiet_log_callback = llama_cpp.llama_log_callback(_quiet_log)


def _silence_llama_logs() -> None:
    llama_cpp.llama_log_set(_quiet_log_callback, ctypes.c_void_p(0))


class Vocabulary:
    """A model file's tokenizer: token ids, their bytes, special tokens, the chat
    template. `LlamaCppRunner` is one; `LlamaCppVocab` is one without weights."""

    _model: llama_cpp.llama_model_p
    _vocab: llama_cpp.llama_vocab_p

    def _read_vocabulary(self) -> None:
        self.vocab_size = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self._model)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        self._pieces = [self._piece(t) for t in range(self.vocab_size)]
        # Control tokens render empty in generated text and as their text in an echo.
        self._special_pieces = {
            t: piece
            for t in range(self.vocab_size)
            if not self._pieces[t] and (piece := self._piece(t, special=True))
        }
        self._eog = np.array(
            [bool(llama_cpp.llama_vocab_is_eog(self._vocab, t)) for t in range(self.vocab_size)]
        )

    def _piece(self, token: int, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        if special:
            return self._special_pieces.get(token) or self._pieces[token]
        return self._pieces[token]

    def is_eog(self, token: int) -> bool:
        return bool(self._eog[token])

    def tokenize(
        self, text: str, add_special: bool = True, parse_special: bool = True
    ) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 2
        buf = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(
            self._vocab, data, len(data), buf, capacity, add_special, parse_special
        )
        if n < 0:
            capacity = -n
            buf = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(
                self._vocab, data, len(data), buf, capacity, add_special, parse_special
            )
        return list(buf[:n])

    def tokenizer_info(self) -> TokenizerInfo:
        def text(token: int) -> str | None:
            if not 0 <= token < self.vocab_size:  # LLAMA_TOKEN_NULL: the model has none
                return None
            return self._piece(token, special=True).decode("utf-8", "replace")

        template = llama_cpp.llama_model_chat_template(self._model, None)
        return TokenizerInfo(
            bos_token=text(llama_cpp.llama_vocab_bos(self._vocab)),
            eos_token=text(llama_cpp.llama_vocab_eos(self._vocab)),
            pad_token=text(llama_cpp.llama_vocab_pad(self._vocab)),
            add_bos_token=self.add_bos,
            add_eos_token=bool(llama_cpp.llama_vocab_get_add_eos(self._vocab)),
            chat_template=template.decode("utf-8", "replace") if template else None,
        )

    def grammar_tokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's tokenizer for this vocabulary (~0.2 s to build)."""
        from llguidance.llamacpp import lltokenizer_from_vocab

        return lltokenizer_from_vocab(self._vocab)

    def detokenize(self, token_ids: Sequence[int], special: bool = False) -> str:
        # Negative ids are image positions (runner.media): they render as nothing.
        data = b"".join(self.token_bytes(t, special) for t in token_ids if t >= 0)
        return data.decode("utf-8", "replace")


class LlamaCppVocab(Vocabulary):
    """Only the vocabulary of a model file (llama.cpp's `vocab_only` load: no weights
    read, no context): what a cluster's HTTP ingress needs to tokenize and validate
    requests and compile grammars, while the replicas hold the model."""

    def __init__(self, model_path: str) -> None:
        model = load_vocab_only(model_path)
        if model is None:
            raise LoadError(f"llama.cpp could not load the model {model_path}")
        self._model = model
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self._read_vocabulary()

    def close(self) -> None:
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None  # type: ignore[assignment]


class LlamaCppRunner(Vocabulary):
    def __init__(
        self, config: LlamaCppConfig, progress: Callable[[float], None] | None = None
    ) -> None:
        init_backend(config.verbose)
        self.config = config

        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = config.n_gpu_layers
        if progress is not None:
            # Keep the ctypes callback alive for as long as loading lasts.
            def _on_progress(fraction: float, _user: ctypes.c_void_p) -> bool:
                progress(fraction)
                return True

            self._progress_cb = llama_cpp.llama_progress_callback(_on_progress)
            mparams.progress_callback = self._progress_cb
        model = llama_cpp.llama_model_load_from_file(config.model_path.encode(), mparams)
        if not model:
            raise LoadError(f"llama.cpp could not load the model {config.model_path}")
        self._model = model
        self._vocab = llama_cpp.llama_model_get_vocab(model)

        n_threads = config.n_threads or available_cores()
        cparams = llama_cpp.llama_context_default_params()
        n_ctx, n_batch = context_shape(config)
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch  # one ubatch per call: a failed call leaves no partial state
        cparams.n_seq_max = config.n_seq_max
        cparams.n_threads = n_threads
        cparams.n_threads_batch = n_threads
        cparams.kv_unified = config.kv_unified
        cparams.no_perf = True
        cparams.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if config.flash_attn
            else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            llama_cpp.llama_model_free(model)
            raise LoadError(
                f"llama.cpp could not create a context of {n_ctx} KV cells "
                "(--ctx-size; not enough memory?)"
            )
        self._ctx = ctx
        self._mem = llama_cpp.llama_get_memory(ctx)

        self.n_threads = n_threads
        self.n_ctx = llama_cpp.llama_n_ctx(ctx)
        self.n_batch = llama_cpp.llama_n_batch(ctx)
        self.n_seq_max = llama_cpp.llama_n_seq_max(ctx)
        # Without a unified cache each sequence id has its own stream of n_ctx / n_seq_max
        # cells: a sequence holds at most that many.
        self.kv_unified = config.kv_unified
        self.n_ctx_seq = self.n_ctx if config.kv_unified else self.n_ctx // self.n_seq_max
        self._read_vocabulary()
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._token_view = np.ctypeslib.as_array(self._batch.token, shape=(self.n_batch,))
        self._pos_view = np.ctypeslib.as_array(self._batch.pos, shape=(self.n_batch,))
        self._nseq_view = np.ctypeslib.as_array(self._batch.n_seq_id, shape=(self.n_batch,))
        self._logits_view = np.ctypeslib.as_array(self._batch.logits, shape=(self.n_batch,))
        self._nseq_view[:] = 1
        self._seq_slot = [self._batch.seq_id[i] for i in range(self.n_batch)]
        self.media: MtmdMedia | None = None
        if config.mmproj_path is not None:
            self.media = MtmdMedia(config.mmproj_path, model, ctx, n_threads, self.n_batch)

    # -- compute -----------------------------------------------------------

    def forward(self, batch: Batch) -> npt.NDArray[np.float32]:
        n = len(batch)
        if n == 0 or n > self.n_batch:
            raise ValueError(f"batch of {n} tokens; the context takes 1..{self.n_batch}")
        self._token_view[:n] = batch.tokens
        self._pos_view[:n] = batch.positions
        self._logits_view[:n] = batch.want_logits
        slots = self._seq_slot
        for i, seq_id in enumerate(batch.seq_ids):
            slots[i][0] = seq_id
        self._batch.n_tokens = n
        rc = llama_cpp.llama_decode(self._ctx, self._batch)
        if rc == 1:
            raise KVCacheFull()
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}")
        rows = batch.num_logits
        if rows == 0:
            return np.empty((0, self.vocab_size), dtype=np.float32)
        ptr = llama_cpp.llama_get_logits(self._ctx)
        # A view of llama.cpp's buffer, valid until the next forward (Runner.forward):
        # copying a scored prompt's rows would cost tens of MB per step.
        return np.ctypeslib.as_array(ptr, shape=(rows, self.vocab_size))

    def seq_remove(self, seq_id: int, start: int = 0, end: int = -1) -> None:
        llama_cpp.llama_memory_seq_rm(self._mem, seq_id, start, end)

    @property
    def gpu_offload(self) -> bool:
        """llama.cpp was built with a GPU backend (CUDA, Metal, ...): layers can go there."""
        return bool(llama_cpp.llama_supports_gpu_offload())

    def seq_end(self, seq_id: int) -> int:
        """One past the last position llama.cpp holds for the sequence (0 when empty):
        what tests compare the engine's ledger with."""
        return int(llama_cpp.llama_memory_seq_pos_max(self._mem, seq_id)) + 1

    def seq_copy(self, src: int, dst: int, start: int, end: int) -> None:
        if self.config.kv_unified:
            llama_cpp.llama_memory_seq_cp(self._mem, src, dst, start, end)
            return
        # Across streams llama.cpp copies whole sequences only (into an empty dst):
        # copy all of src, then drop what dst should not have.
        llama_cpp.llama_memory_seq_cp(self._mem, src, dst, -1, -1)
        if start > 0:
            llama_cpp.llama_memory_seq_rm(self._mem, dst, 0, start)
        if end >= 0:
            llama_cpp.llama_memory_seq_rm(self._mem, dst, end, -1)

    def close(self) -> None:
        if self.media is not None:
            self.media.close()
            self.media = None
        if self._ctx:
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            llama_cpp.llama_model_free(self._model)
            self._ctx = None
