"""A tiny random-weight vision-language model, written as GGUF files for tests.

``make_tiny_vlm(directory)`` writes two files in a few milliseconds:

* ``tiny-lm.gguf``: a 2-block llama (embedding 64, 4 heads, 2 KV heads, FFN 128,
  context 512) with a byte-level GPT-2 style BPE vocabulary: the 256 bytes as
  pieces in GPT-2's byte-to-unicode form (ids 0..255, id == byte value), a few
  merged pieces so the BPE merge path is exercised, and the special tokens
  ``<|bos|>`` / ``<|eos|>``. Any UTF-8 text tokenizes and detokenizes back
  exactly. ``output.weight`` is separate from ``token_embd.weight``.
* ``tiny-mmproj.gguf``: a CLIP ViT projector as libmtmd's clip.cpp reads it
  (LLaVA ``mlp`` projector): 32x32 pixel images, 8x8 patches -> 16 image
  tokens, 2 encoder blocks (llava uses the output of the penultimate one),
  projected to the language model's embedding width.

Weights are random (fixed numpy seed) so the files are deterministic; the
model's output is meaningless but an image changes it.
"""

from __future__ import annotations

import pathlib

import gguf
import numpy as np

LM_FILE = "tiny-lm.gguf"
MMPROJ_FILE = "tiny-mmproj.gguf"

# language model
N_EMBD = 64
N_LAYER = 2
N_HEAD = 4
N_HEAD_KV = 2
N_FF = 128
N_CTX = 512
RMS_EPS = 1e-5

# vision encoder
IMAGE_SIZE = 32
PATCH_SIZE = 8
V_EMBD = 64
V_LAYER = 2
V_HEAD = 4
V_FF = 128
V_EPS = 1e-5
MM_HIDDEN = 64
N_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 16

SEED = 1234

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
# merges as GPT-2 writes them ("Ġ" is the byte-level form of a space)
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "e r"]


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of bytes to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def vocab() -> tuple[list[str], list[int], int, int]:
    """The token pieces, their token types, and the BOS and EOS ids."""
    table = _byte_to_unicode()
    tokens = [table[b] for b in range(256)]
    types = [gguf.TokenType.NORMAL] * 256
    for merge in MERGES:
        tokens.append(merge.replace(" ", ""))
        types.append(gguf.TokenType.NORMAL)
    bos = len(tokens)
    tokens.append(BOS_TOKEN)
    types.append(gguf.TokenType.CONTROL)
    eos = len(tokens)
    tokens.append(EOS_TOKEN)
    types.append(gguf.TokenType.CONTROL)
    return tokens, [int(t) for t in types], bos, eos


def _finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write_lm(path: pathlib.Path, rng: np.random.Generator) -> None:
    tokens, types, bos, eos = vocab()
    n_vocab = len(tokens)
    head_dim = N_EMBD // N_HEAD

    def linear(n_out: int, n_in: int) -> np.ndarray:
        # numpy row-major [out, in]; GGUF stores ne = [in, out] as llama.cpp expects
        return (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("fireside-tiny-vlm-lm")
    w.add_context_length(N_CTX)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_layer_norm_rms_eps(RMS_EPS)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    w.add_tensor("token_embd.weight", rng.standard_normal((n_vocab, N_EMBD)).astype(np.float32))
    for i in range(N_LAYER):
        p = f"blk.{i}"
        w.add_tensor(f"{p}.attn_norm.weight", np.ones(N_EMBD, np.float32))
        w.add_tensor(f"{p}.attn_q.weight", linear(N_HEAD * head_dim, N_EMBD))
        w.add_tensor(f"{p}.attn_k.weight", linear(N_HEAD_KV * head_dim, N_EMBD))
        w.add_tensor(f"{p}.attn_v.weight", linear(N_HEAD_KV * head_dim, N_EMBD))
        w.add_tensor(f"{p}.attn_output.weight", linear(N_EMBD, N_HEAD * head_dim))
        w.add_tensor(f"{p}.ffn_norm.weight", np.ones(N_EMBD, np.float32))
        w.add_tensor(f"{p}.ffn_gate.weight", linear(N_FF, N_EMBD))
        w.add_tensor(f"{p}.ffn_up.weight", linear(N_FF, N_EMBD))
        w.add_tensor(f"{p}.ffn_down.weight", linear(N_EMBD, N_FF))
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, np.float32))
    w.add_tensor("output.weight", linear(n_vocab, N_EMBD) * 4.0)
    _finish(w)


def _write_mmproj(path: pathlib.Path, rng: np.random.Generator) -> None:
    def linear(n_out: int, n_in: int) -> np.ndarray:
        return (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32)

    def bias(n: int) -> np.ndarray:
        return (0.02 * rng.standard_normal(n)).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return np.ones(n, np.float32)

    w = gguf.GGUFWriter(str(path), "clip")
    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_name("fireside-tiny-vlm-mmproj")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_clip_has_vision_encoder(True)
    w.add_clip_projector_type("mlp")
    w.add_vision_image_size(IMAGE_SIZE)
    w.add_vision_patch_size(PATCH_SIZE)
    w.add_vision_embedding_length(V_EMBD)
    w.add_vision_feed_forward_length(V_FF)
    w.add_vision_block_count(V_LAYER)
    w.add_vision_head_count(V_HEAD)
    w.add_vision_attention_layernorm_eps(V_EPS)
    w.add_vision_projection_dim(N_EMBD)
    w.add_vision_image_mean([0.5, 0.5, 0.5])
    w.add_vision_image_std([0.5, 0.5, 0.5])
    w.add_vision_use_gelu(True)

    # conv kernel in PyTorch layout [out_ch, in_ch, kh, kw] -> ggml ne [kw, kh, in_ch, out_ch]
    patch = rng.standard_normal((V_EMBD, 3, PATCH_SIZE, PATCH_SIZE)) / np.sqrt(3 * PATCH_SIZE**2)
    w.add_tensor("v.patch_embd.weight", patch.astype(np.float32))
    w.add_tensor("v.patch_embd.bias", bias(V_EMBD))
    w.add_tensor(
        "v.position_embd.weight",
        (0.1 * rng.standard_normal((N_IMAGE_TOKENS, V_EMBD))).astype(np.float32),
    )
    w.add_tensor("v.pre_ln.weight", norm(V_EMBD))
    w.add_tensor("v.pre_ln.bias", np.zeros(V_EMBD, np.float32))
    for i in range(V_LAYER):
        p = f"v.blk.{i}"
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            w.add_tensor(f"{p}.{name}.weight", linear(V_EMBD, V_EMBD))
            w.add_tensor(f"{p}.{name}.bias", bias(V_EMBD))
        w.add_tensor(f"{p}.ln1.weight", norm(V_EMBD))
        w.add_tensor(f"{p}.ln1.bias", np.zeros(V_EMBD, np.float32))
        w.add_tensor(f"{p}.ln2.weight", norm(V_EMBD))
        w.add_tensor(f"{p}.ln2.bias", np.zeros(V_EMBD, np.float32))
        # HF naming: ffn_up is fc1 [n_ff, n_embd], ffn_down is fc2 [n_embd, n_ff]
        w.add_tensor(f"{p}.ffn_up.weight", linear(V_FF, V_EMBD))
        w.add_tensor(f"{p}.ffn_up.bias", bias(V_FF))
        w.add_tensor(f"{p}.ffn_down.weight", linear(V_EMBD, V_FF))
        w.add_tensor(f"{p}.ffn_down.bias", bias(V_EMBD))
    # LLaVA projector: Linear(v_embd -> hidden), GELU, Linear(hidden -> lm_embd)
    w.add_tensor("mm.0.weight", linear(MM_HIDDEN, V_EMBD))
    w.add_tensor("mm.0.bias", bias(MM_HIDDEN))
    w.add_tensor("mm.2.weight", linear(N_EMBD, MM_HIDDEN))
    w.add_tensor("mm.2.bias", bias(N_EMBD))
    _finish(w)


def make_tiny_vlm(directory: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """Write the tiny language model and its projector; return (lm_path, mmproj_path)."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lm_path = directory / LM_FILE
    mmproj_path = directory / MMPROJ_FILE
    rng = np.random.default_rng(SEED)
    _write_lm(lm_path, rng)
    _write_mmproj(mmproj_path, rng)
    return lm_path, mmproj_path
