"""End-to-end check of the tiny VLM from tests/vlm.py, with llama.cpp and libmtmd.

Run: .venv/bin/python tests/vlm_check.py [-v]

Writes the two GGUF files into a temporary directory, then
  * loads the language model and checks its tokenizer (UTF-8 round trip, the media marker),
  * loads the projector with mtmd (vision support),
  * tokenizes "describe <__media__> please" with an image -> text, image (16 tokens), text,
  * encodes the image, feeds its embeddings to the LM with a llama_batch (embd), decodes the
    text chunks as tokens, and reads the logits after the last token,
  * shows that two different images give different logits and the same image identical ones.
Everything runs with 1 thread. Exit status 0 on success.
"""

from __future__ import annotations

import ctypes
import pathlib
import sys
import tempfile
import time

import llama_cpp
import llama_cpp.mtmd_cpp as mtmd
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from vlm import N_IMAGE_TOKENS, make_tiny_vlm  # noqa: E402

VERBOSE = "-v" in sys.argv[1:]
LOG: list[str] = []


@llama_cpp.llama_log_callback
def _log(level, text, user_data):  # noqa: ARG001
    msg = text.decode("utf-8", "replace")
    LOG.append(msg)
    if VERBOSE:
        sys.stderr.write(msg)


def fail(msg: str) -> None:
    sys.stderr.write("".join(LOG[-60:]))
    raise SystemExit(f"FAIL: {msg}")


def tokenize(vocab, text: bytes, add_special: bool, parse_special: bool) -> list[int]:
    cap = 4 * len(text) + 8
    buf = (llama_cpp.llama_token * cap)()
    n = llama_cpp.llama_tokenize(vocab, text, len(text), buf, cap, add_special, parse_special)
    if n < 0:
        fail(f"llama_tokenize returned {n}")
    return list(buf[:n])


def detokenize(vocab, tokens: list[int]) -> bytes:
    arr = (llama_cpp.llama_token * len(tokens))(*tokens)
    cap = 4 * len(tokens) + 16
    out = ctypes.create_string_buffer(cap)
    n = llama_cpp.llama_detokenize(vocab, arr, len(tokens), out, cap, True, False)
    if n < 0:
        fail(f"llama_detokenize returned {n}")
    return out.raw[:n]


def check_tokenizer(vocab) -> None:
    marker = mtmd.mtmd_default_marker()
    samples = [
        b"hello, the world",
        "héllo wörld — 日本語 🙂\n\ttabs  and  spaces".encode(),
        marker,
        b"describe " + marker + b" please",
        "".join(chr(c) for c in range(1, 0x800, 7)).encode(),  # control chars, Latin, ...
    ]
    for text in samples:
        toks = tokenize(vocab, text, add_special=False, parse_special=True)
        back = detokenize(vocab, toks)
        if back != text:
            fail(f"tokenizer round trip: {text!r} -> {toks} -> {back!r}")
    with_bos = tokenize(vocab, b"the", add_special=True, parse_special=False)
    bos = llama_cpp.llama_vocab_bos(vocab)
    eos = llama_cpp.llama_vocab_eos(vocab)
    if with_bos[0] != bos:
        fail(f"no BOS added: {with_bos}")
    if tokenize(vocab, b"<|eos|>", add_special=False, parse_special=True) != [eos]:
        fail("<|eos|> is not parsed as the EOS special token")
    if not llama_cpp.llama_vocab_is_eog(vocab, eos):
        fail("EOS is not an end-of-generation token")
    print(
        f"tokenizer: n_vocab={llama_cpp.llama_vocab_n_tokens(vocab)} bos={bos} "
        f"eos={eos}; 'the' -> {with_bos}; "
        f"{marker.decode()!r} -> {tokenize(vocab, marker, False, True)}; round trips ok"
    )


def decode_tokens(ctx, tokens: list[int], pos0: int, want_logits: bool) -> None:
    batch = llama_cpp.llama_batch_init(len(tokens), 0, 1)
    try:
        batch.n_tokens = len(tokens)
        for i, tok in enumerate(tokens):
            batch.token[i] = tok
            batch.pos[i] = pos0 + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = want_logits and i == len(tokens) - 1
        rc = llama_cpp.llama_decode(ctx, batch)
        if rc != 0:
            fail(f"llama_decode (tokens) returned {rc}")
    finally:
        llama_cpp.llama_batch_free(batch)


def decode_embd(ctx, embd: np.ndarray, pos0: int) -> None:
    n, dim = embd.shape
    batch = llama_cpp.llama_batch_init(n, dim, 1)
    try:
        batch.n_tokens = n
        ctypes.memmove(batch.embd, embd.ctypes.data, embd.nbytes)
        for i in range(n):
            batch.pos[i] = pos0 + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = False
        rc = llama_cpp.llama_decode(ctx, batch)
        if rc != 0:
            fail(f"llama_decode (embeddings) returned {rc}")
    finally:
        llama_cpp.llama_batch_free(batch)


def run_prompt(mctx, ctx, n_embd: int, n_vocab: int, image: np.ndarray, verbose: bool):
    """Tokenize prompt + image with mtmd, evaluate all chunks, return last-token logits."""
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    img = np.ascontiguousarray(image, dtype=np.uint8)
    ny, nx, _ = img.shape
    bitmap = mtmd.mtmd_bitmap_init(nx, ny, img.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
    if not bitmap:
        fail("mtmd_bitmap_init failed")
    chunks = mtmd.mtmd_input_chunks_init()
    try:
        prompt = b"describe " + mtmd.mtmd_default_marker() + b" please"
        text = mtmd.mtmd_input_text(prompt, len(prompt), True, True)
        bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
        rc = mtmd.mtmd_tokenize(mctx, chunks, ctypes.byref(text), bitmaps, 1)
        if rc != 0:
            fail(f"mtmd_tokenize returned {rc}")
        n_chunks = mtmd.mtmd_input_chunks_size(chunks)
        kinds = []
        pos = 0
        n_image_tokens = 0
        for ci in range(n_chunks):
            chunk = mtmd.mtmd_input_chunks_get(chunks, ci)
            ctype = mtmd.mtmd_input_chunk_get_type(chunk)
            n_tok = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
            last = ci == n_chunks - 1
            if ctype == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n_out = ctypes.c_size_t(0)
                ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n_out))
                toks = [ptr[i] for i in range(n_out.value)]
                kinds.append(f"text{toks}")
                decode_tokens(ctx, toks, pos, want_logits=last)
                pos += len(toks)
            elif ctype == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                n_image_tokens = n_tok
                kinds.append(f"image({n_tok} tokens)")
                if mtmd.mtmd_encode_chunk(mctx, chunk) != 0:
                    fail("mtmd_encode_chunk failed")
                out = mtmd.mtmd_get_output_embd(mctx)
                embd = np.ctypeslib.as_array(out, shape=(n_tok * n_embd,)).reshape(n_tok, n_embd)
                embd = embd.astype(np.float32, copy=True)
                decode_embd(ctx, embd, pos)
                pos += mtmd.mtmd_input_chunk_get_n_pos(chunk)
                if last:
                    fail("prompt ends with an image chunk")
            else:
                fail(f"unexpected chunk type {ctype}")
        if verbose:
            print(f"chunks: {' | '.join(kinds)}  (n_pos={pos})")
        logits = llama_cpp.llama_get_logits_ith(ctx, -1)
        return np.ctypeslib.as_array(logits, shape=(n_vocab,)).copy(), kinds, n_image_tokens
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)


def main() -> int:
    llama_cpp.llama_log_set(_log, None)
    mtmd.mtmd_log_set(_log, None)
    llama_cpp.llama_backend_init()

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        lm_path, mmproj_path = make_tiny_vlm(pathlib.Path(tmp))
        gen_ms = (time.perf_counter() - t0) * 1e3
        # determinism: a second generation gives identical bytes
        lm2, mm2 = make_tiny_vlm(pathlib.Path(tmp) / "again")
        same = (
            lm_path.read_bytes() == lm2.read_bytes()
            and mmproj_path.read_bytes() == mm2.read_bytes()
        )
        print(
            f"generated in {gen_ms:.1f} ms: {lm_path.name} {lm_path.stat().st_size} B, "
            f"{mmproj_path.name} {mmproj_path.stat().st_size} B; deterministic={same}"
        )
        if not same:
            fail("files differ between two generations")

        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = 0
        model = llama_cpp.llama_model_load_from_file(str(lm_path).encode(), mparams)
        if not model:
            fail("llama_model_load_from_file failed")
        vocab = llama_cpp.llama_model_get_vocab(model)
        n_embd = llama_cpp.llama_model_n_embd(model)
        n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        check_tokenizer(vocab)

        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = 512
        cparams.n_batch = 512
        cparams.n_ubatch = 512
        cparams.n_threads = 1
        cparams.n_threads_batch = 1
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            fail("llama_init_from_model failed")

        # plain text decode
        decode_tokens(ctx, tokenize(vocab, b"hello world", True, False), 0, want_logits=True)
        print("llama_decode on text: ok")

        params = mtmd.mtmd_context_params_default()
        params.use_gpu = False
        params.n_threads = 1
        params.print_timings = False
        params.warmup = True
        mctx = mtmd.mtmd_init_from_file(str(mmproj_path).encode(), model, params)
        if not mctx:
            fail("mtmd_init_from_file failed")
        if not mtmd.mtmd_support_vision(mctx):
            fail("mtmd_support_vision is false")
        print(
            f"mtmd_init_from_file: ok, vision={mtmd.mtmd_support_vision(mctx)}, "
            f"marker={mtmd.mtmd_default_marker().decode()!r}"
        )

        rng = np.random.default_rng(0)
        img_a = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        img_b = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)

        t0 = time.perf_counter()
        la, kinds, n_img = run_prompt(mctx, ctx, n_embd, n_vocab, img_a, verbose=True)
        run_ms = (time.perf_counter() - t0) * 1e3
        lb, _, _ = run_prompt(mctx, ctx, n_embd, n_vocab, img_b, verbose=False)
        la2, _, _ = run_prompt(mctx, ctx, n_embd, n_vocab, img_a.copy(), verbose=False)

        diff_ab = float(np.max(np.abs(la - lb)))
        diff_aa = float(np.max(np.abs(la - la2)))
        print(f"image tokens: {n_img}")
        print(f"max |logits(A) - logits(B)| = {diff_ab:.6g}  (different images)")
        print(f"max |logits(A) - logits(A')| = {diff_aa:.6g}  (same image, re-run)")
        print(f"argmax A={int(la.argmax())} B={int(lb.argmax())}; one prompt run {run_ms:.1f} ms")

        ok = (
            len(kinds) == 3
            and kinds[0].startswith("text")
            and kinds[1] == f"image({N_IMAGE_TOKENS} tokens)"
            and kinds[2].startswith("text")
            and n_img == N_IMAGE_TOKENS
            and diff_ab > 1e-3
            and diff_aa == 0.0
            and np.all(np.isfinite(la))
        )

        mtmd.mtmd_free(mctx)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)

    if not ok:
        fail("checks did not pass")
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
