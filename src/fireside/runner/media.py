"""Images through llama.cpp's multimodal library (libmtmd): tokenize, encode, evaluate.

A prompt with images becomes one token list in which every image occupies as
many positions as it has embeddings. Those positions hold placeholder ids
(negative, derived from the image bytes' hash): they never reach llama.cpp as
tokens, but they make two prompts with the same image at the same place compare
equal, so the prefix cache reuses an image's KV instead of encoding it again.
The image chunks themselves are kept (mtmd chunk copies) until the request ends,
and evaluated into a sequence with `MtmdMedia.evaluate`. `MtmdMedia` and
`MtmdPrompt` implement `runner.base.Media` and `runner.base.MediaPrompt`.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import llama_cpp
import llama_cpp.mtmd_cpp as mtmd
import numpy as np
import numpy.typing as npt

from fireside.runner.base import ImageSpan

MARKER = "<image>"  # the API's marker; replaced by mtmd's own before tokenizing


@dataclass
class MtmdPrompt:
    """A tokenized prompt with images; `close()` frees the image chunks."""

    token_ids: list[int]
    spans: list[ImageSpan] = field(default_factory=list)

    def close(self) -> None:
        for span in self.spans:
            if span.chunk:
                mtmd.mtmd_input_chunk_free(span.chunk)
                span.chunk = None

    def __del__(self) -> None:  # a request dropped before reaching the engine
        self.close()


def placeholder(digest: bytes) -> int:
    """The id image positions carry: negative, so never a real token."""
    return -1 - int.from_bytes(digest[:7], "big")


class MtmdMedia:
    """The projector of one model, bound to its llama.cpp context."""

    def __init__(
        self,
        mmproj_path: str,
        model: llama_cpp.llama_model_p,
        ctx: llama_cpp.llama_context_p,
        n_threads: int,
        n_batch: int,
    ) -> None:
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = False
        params.n_threads = n_threads
        params.print_timings = False
        params.warmup = False
        self._ctx = mtmd.mtmd_init_from_file(mmproj_path.encode(), model, params)
        if not self._ctx:
            raise RuntimeError(f"could not load the projector {mmproj_path}")
        if not mtmd.mtmd_support_vision(self._ctx):
            raise RuntimeError(f"{mmproj_path} has no vision encoder")
        if mtmd.mtmd_decode_use_mrope(self._ctx):
            raise RuntimeError(f"{mmproj_path}: models with M-RoPE are not supported yet")
        self._llama = ctx
        self._n_embd = llama_cpp.llama_model_n_embd(model)
        self._n_batch = n_batch
        self._marker = mtmd.mtmd_default_marker()
        # Tokenizing (image preprocessing) runs on API worker threads, encoding on the
        # engine thread: one at a time, since the mtmd context is shared.
        self._lock = threading.Lock()
        self._batch = llama_cpp.llama_batch_init(n_batch, self._n_embd, 1)

    def tokenize(
        self, text: str, images: Sequence[npt.NDArray[np.uint8]], digests: Sequence[bytes]
    ) -> MtmdPrompt:
        """Text with one `<image>` marker per image (RGB uint8 arrays) to a prompt."""
        data = text.replace(MARKER, self._marker.decode()).encode()
        bitmaps = []
        for rgb, digest in zip(images, digests, strict=True):
            rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
            ny, nx = rgb.shape[:2]
            bitmap = mtmd.mtmd_bitmap_init(
                nx, ny, rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
            )
            if not bitmap:
                raise ValueError("could not make a bitmap of an image")
            mtmd.mtmd_bitmap_set_id(bitmap, digest.hex().encode())
            bitmaps.append(bitmap)
        chunks = mtmd.mtmd_input_chunks_init()
        prompt = MtmdPrompt([])
        try:
            text_in = mtmd.mtmd_input_text(data, len(data), True, True)
            array = (mtmd.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*bitmaps)
            with self._lock:
                rc = mtmd.mtmd_tokenize(
                    self._ctx, chunks, ctypes.byref(text_in), array, len(bitmaps)
                )
            if rc != 0:
                raise ValueError(f"the prompt and its images could not be tokenized ({rc})")
            image_index = 0
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    n = ctypes.c_size_t()
                    ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                    prompt.token_ids.extend(ptr[i] for i in range(n.value))
                    continue
                num_pos = mtmd.mtmd_input_chunk_get_n_pos(chunk)
                span = ImageSpan(
                    start=len(prompt.token_ids),
                    num_pos=num_pos,
                    num_tokens=mtmd.mtmd_input_chunk_get_n_tokens(chunk),
                    chunk=mtmd.mtmd_input_chunk_copy(chunk),
                )
                prompt.spans.append(span)
                prompt.token_ids.extend([placeholder(digests[image_index])] * num_pos)
                image_index += 1
        except BaseException:
            prompt.close()
            raise
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            for bitmap in bitmaps:
                mtmd.mtmd_bitmap_free(bitmap)
        return prompt

    def evaluate(
        self, span: ImageSpan, seq_id: int, want_logits: bool
    ) -> npt.NDArray[np.float32] | None:
        """Encode an image and decode its embeddings into a sequence at span.start.

        Returns the logits after the image's last position when asked (an image at
        the very end of a prompt chooses the first generated token).
        """
        with self._lock:
            if mtmd.mtmd_encode_chunk(self._ctx, span.chunk) != 0:
                raise RuntimeError("encoding an image failed")
            out = mtmd.mtmd_get_output_embd(self._ctx)
            embd = np.ctypeslib.as_array(out, shape=(span.num_tokens * self._n_embd,)).copy()
        embd = embd.reshape(span.num_tokens, self._n_embd)
        logits = None
        non_causal = mtmd.mtmd_decode_use_non_causal(self._ctx, span.chunk)
        if non_causal:  # some projectors attend over the whole image at once
            llama_cpp.llama_set_causal_attn(self._llama, False)
        try:
            logits = self._decode(span, embd, seq_id, want_logits)
        finally:
            if non_causal:
                llama_cpp.llama_set_causal_attn(self._llama, True)
        return logits

    def _decode(
        self, span: ImageSpan, embd: npt.NDArray[np.float32], seq_id: int, want_logits: bool
    ) -> npt.NDArray[np.float32] | None:
        batch = self._batch
        logits = None
        for lo in range(0, span.num_tokens, self._n_batch):
            hi = min(lo + self._n_batch, span.num_tokens)
            n = hi - lo
            ctypes.memmove(batch.embd, embd[lo:hi].ctypes.data, embd[lo:hi].nbytes)
            last = want_logits and hi == span.num_tokens
            for i in range(n):
                batch.pos[i] = span.start + lo + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq_id
                batch.logits[i] = last and i == n - 1
            batch.n_tokens = n
            rc = llama_cpp.llama_decode(self._llama, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode of image embeddings failed ({rc})")
            if last:
                ptr = llama_cpp.llama_get_logits(self._llama)
                vocab = llama_cpp.llama_vocab_n_tokens(
                    llama_cpp.llama_model_get_vocab(llama_cpp.llama_get_model(self._llama))
                )
                logits = np.ctypeslib.as_array(ptr, shape=(1, vocab)).copy()
        return logits

    def close(self) -> None:
        if self._ctx:
            llama_cpp.llama_batch_free(self._batch)
            mtmd.mtmd_free(self._ctx)
            self._ctx = None
