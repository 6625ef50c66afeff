"""Server settings: the one place a default lives.

Each `ServeConfig` field is one `fireside serve` flag: its metadata carries the flag's
name, help and bounds, and `cli.py` builds the parser from them. The lower layers'
configs (`EngineConfig`, `LlamaCppConfig`, `CompletionService`'s settings) have no
defaults of their own: `server.py` fills them from here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fireside.models import resolve_aliases, resolve_models

# llama.cpp's LLAMA_MAX_SEQ: the most sequence ids one context may have.
MAX_SEQUENCES = 256
# --deterministic: the fewest KV cells one sequence id may have.
MIN_DETERMINISTIC_CELLS = 512


def setting(
    default: Any,
    flag: str,
    help: str,
    *,
    metavar: str | None = None,
    choices: tuple[str, ...] | None = None,
    low: float | None = None,
    high: float | None = None,
    positive: bool = False,
) -> Any:
    """A field that is also a flag. `low`/`high` bound it (inclusive); `positive` asks
    for more than 0. The flag's type comes from the field's annotation."""
    meta: dict[str, Any] = {"flag": flag, "help": help, "metavar": metavar, "choices": choices}
    meta |= {"low": low, "high": high, "positive": positive}
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class ServeConfig:
    host: str = setting("127.0.0.1", "--host", "address to listen on")
    port: int = setting(8000, "--port", "port to listen on (0: any free)", low=0, high=65535)
    # None of these (no --model) serves the embedded SmolLM2-135M-Instruct.
    models: tuple[str, ...] = setting(
        (),
        "--model",
        "a GGUF model to serve, repeatable (each gets its own engine); "
        "without it, the embedded SmolLM2-135M-Instruct Q4_1",
        metavar="[NAME=]PATH.gguf",
    )
    mmproj: tuple[str, ...] = setting(
        (),
        "--mmproj",
        "a model's vision projector (libmtmd): requests to it may carry images",
        metavar="[NAME=]PATH.gguf",
    )
    aliases: tuple[str, ...] = setting(
        (),
        "--alias",
        "another id clients may use for a loaded model (repeatable), "
        "e.g. accounts/fireworks/models/x=SmolLM2-135M-Instruct",
        metavar="ALIAS=NAME",
    )
    chat_template: str | None = setting(
        None,
        "--chat-template",
        "a Jinja chat template for /chat/completions, used instead of the one in the "
        "model file (a template file, or a tokenizer_config.json with `chat_template`)",
        metavar="FILE",
    )
    max_image_bytes: int = setting(
        10 * 2**20,
        "--max-image-bytes",
        "largest image accepted, in bytes (after base64 decoding)",
        metavar="N",
        low=1,
    )
    model_name: str | None = setting(
        None,
        "--model-name",
        "model id clients send in `model` (default: the file's name without .gguf)",
        metavar="NAME",
    )
    # Also read from FIRESIDE_API_KEYS (cli.py); none at all: the server is open.
    api_keys: tuple[str, ...] = setting(
        (),
        "--api-key",
        "accept this Bearer key (repeatable); also read from FIRESIDE_API_KEYS "
        "(comma-separated). With no key at all the server is open to anyone",
        metavar="KEY",
    )
    # Per-sequence streams (the default, issue 13): 32 ids x 2,048 cells, 1.5 GB of KV for
    # the embedded model. --kv-unified: one pool, what one request may use whole.
    ctx_size: int = setting(
        65536,
        "--ctx-size",
        "KV cache cells in all. Each of the --parallel + --prefix-cache sequence ids "
        "gets ctx-size / ids of them to itself (rounded up to 256), which bounds one "
        "request's context (llama-server's -c); in a unified cache (see --kv-unified) "
        "they are one pool all sequences share, and a request may use all of it",
        metavar="N",
        low=64,
        high=2**31 - 1,  # llama.cpp's positions are 32-bit
    )
    parallel: int = setting(
        16,
        "--parallel",
        "sequences decoding at once (a request with n above this runs alone)",
        metavar="N",
        low=1,
        high=MAX_SEQUENCES,
    )
    threads: int = setting(
        0,
        "--threads",
        "llama.cpp compute threads (0: the cores this process may use)",
        metavar="N",
        low=0,
    )
    batch_size: int = setting(
        512,
        "--batch-size",
        "most tokens computed in one engine step (prompt chunks plus decode tokens)",
        metavar="N",
        low=1,
        high=8192,
    )
    default_max_tokens: int = setting(
        16,
        "--default-max-tokens",
        "max_tokens when a request does not say",
        metavar="N",
        low=0,
    )
    # True keeps the stop string in the text (the source document's rule), false
    # drops it (OpenAI's).
    include_stop_str_in_output: bool = setting(
        True,
        "--include-stop-str-in-output",
        "whether a text ended by a stop string keeps it, when the request does not say "
        "(include_stop_str_in_output): on, the source document's rule; off, OpenAI's, "
        "which LangChain and lm-eval's generate tasks expect",
    )
    # llama.cpp's own default: every layer on the GPU when it was built with a GPU
    # backend (CUDA, Metal, Vulkan); on a CPU-only build there is nothing to offload.
    gpu_layers: int = setting(
        -1,
        "--gpu-layers",
        "model layers llama.cpp puts on the GPU: -1 all (when llama-cpp-python was built "
        "with a GPU backend), 0 none; ignored on a CPU-only build",
        metavar="N",
        low=-1,
    )
    # Measured: 219 vs 124 tok/s at 16 streams, 2 threads.
    flash_attn: bool = setting(
        True,
        "--flash-attn",
        "llama.cpp's flash attention kernels (1.8x the 16-stream throughput on CPU here)",
    )
    # benchmarks/kv_layout.py: a decode step over 16 sequences' cells takes 1.28x as
    # long in the unified cache, over 64 sequences 4.12x (docs/sweep.md).
    kv_unified: bool = setting(
        False,
        "--kv-unified",
        "one KV pool shared by all sequences: a request may use all the cells and "
        "shared prefixes cost no copy, but every decode row's attention walks all "
        "sequences' cells (4x slower decode at 64 streams); off: each sequence id has "
        "its own stream of cells, as each slot of llama.cpp's server has",
    )
    # A step's length is a gap between two tokens of every running stream. Measured at
    # 16 streams, 2 threads: 128 gave ITL p99 0.49 s but 140 tok/s; 512 gives p99
    # 0.77 s and 182 tok/s.
    prefill_chunk: int = setting(
        512,
        "--prefill-chunk",
        "prompt tokens per step while other streams decode (bounds their token gaps)",
        metavar="N",
        low=1,
    )
    # original is the model's own numbers; auto's Q4_1 -> Q8_0 moves logprobs (issue 11:
    # 0.16 nats mean, 0.65 max on lm-eval loglikelihoods).
    weights: str = setting(
        "original",
        "--weights",
        "original: serve the file as given; auto: convert Q4_1 weights to Q8_0 once "
        "(faster on CPU, but logprobs move: 0.16 nats mean on lm-eval loglikelihoods); "
        "q8_0, q4_0: convert to that format",
        choices=("auto", "original", "q8_0", "q4_0"),
    )
    cache_dir: str | None = setting(
        None,
        "--cache-dir",
        "where converted weights are kept (default: $FIRESIDE_CACHE_DIR or ~/.cache/fireside)",
        metavar="DIR",
    )
    max_waiting: int = setting(
        256,
        "--max-waiting",
        "requests that may wait for a slot; beyond them, 429 with Retry-After",
        metavar="N",
        low=0,
    )
    request_timeout: float = setting(
        600.0,
        "--request-timeout",
        "seconds a request may run before it is stopped with an error",
        metavar="S",
        positive=True,
    )
    shutdown_grace: float = setting(
        30.0,
        "--shutdown-grace",
        "on SIGTERM/SIGINT, seconds running requests get to finish",
        metavar="S",
        low=0,
    )
    # Without --kv-unified each entry is a sequence id with its own stream of cells.
    prefix_cache: int = setting(
        16,
        "--prefix-cache",
        "finished sequences whose KV stays cached for prompts that share a prefix (0: off)",
        metavar="N",
        low=0,
        # With n up to 128 (api.protocol.MAX_N), within MAX_SEQUENCES sequence ids.
        high=128,
    )
    # per-key by default: `cached_tokens` (and time to first token) would otherwise tell
    # one key's user that another key sent the same prefix. It costs nothing with no
    # key or one key; keys of one team that share prompts can opt into `shared`.
    prompt_cache_isolation: str = setting(
        "per-key",
        "--prompt-cache-isolation",
        "per-key: requests share cached prompt KV only with requests sent with the same "
        "API key (and the same prompt_cache_isolation_key); shared: across keys, isolated "
        "only by prompt_cache_isolation_key",
        choices=("per-key", "shared"),
    )
    # Auto: benchmarks/speculation.py measured 1.43x output tok/s on input-grounded work
    # at c=1 and 1.04x (c=1) / 0.99x (c=16) on open-ended stories (issue 14). Requests
    # that send `speculation`/`prediction` are decoded speculatively either way.
    speculate: str = setting(
        "auto",
        "--speculate",
        "speculative decoding: auto also drafts tokens from n-gram matches of each "
        "request's own prompt and output (prompt lookup), while few sequences run; off: "
        "only requests that send `speculation` or `prediction` decode speculatively",
        choices=("auto", "off"),
    )
    # The gain of drafting shrinks as the batch grows (the cores are busy anyway).
    speculate_max_running: int = setting(
        4,
        "--speculate-max-running",
        "with --speculate auto, draft only while at most this many sequences run",
        metavar="N",
        low=1,
        high=MAX_SEQUENCES,
    )
    # Issue 17: batch invariance costs what benchmarks/deterministic.py measures, and
    # KV memory: it stays a choice (docs/api.md, Determinism).
    deterministic: bool = setting(
        False,
        "--deterministic",
        "batch-invariant decoding: a request's logits, samples and scores are bitwise "
        "the same whatever else runs (prompts in fixed chunks, each computed alone; no "
        "speculative drafts; not with --kv-unified)",
    )
    # Cluster mode (issue 16; `pip install 'fireside[ray]'`): the same server with the
    # engine in N Ray Serve replicas and the HTTP API in front of them.
    replicas: int = setting(
        0,
        "--replicas",
        "run under Ray Serve with this many engine replicas (each with --threads "
        "threads and its own KV cache) behind one HTTP ingress; 0: one process, no Ray",
        metavar="N",
        low=0,
    )
    ray_address: str | None = setting(
        None,
        "--ray-address",
        "with --replicas, the Ray cluster to join (ray start's address, e.g. "
        "HOST:6379); without it, a local Ray instance is started",
        metavar="ADDR",
    )
    router: str = setting(
        "prefix",
        "--router",
        "with --replicas, how requests pick a replica: prefix sends a prompt to the "
        "replica holding its longest cached prefix (or its prompt_cache_key/user), "
        "least loaded otherwise; pow2: Ray Serve's own (the power of two choices)",
        choices=("prefix", "pow2"),
    )
    log_level: str = setting(
        "info",
        "--log-level",
        "the least severe log lines shown (on stderr, one format: time level logger: text)",
        choices=("debug", "info", "warning", "error"),
    )

    def problems(self) -> list[str]:
        """What is wrong with these settings, each naming its flag; empty if nothing."""
        bounds = [p for f in dataclasses.fields(self) if (p := _out_of_bounds(self, f))]
        try:
            specs = resolve_models(self.models, self.model_name, self.mmproj)
            resolve_aliases(self.aliases, specs)
        except ValueError as exc:
            return [str(exc), *bounds]
        missing = [
            f"{spec.name}: {path}: no such file"
            for spec in specs
            for path in (spec.path, spec.mmproj)
            if path is not None and not Path(path).is_file()
        ]
        if self.chat_template is not None and not Path(self.chat_template).is_file():
            missing.append(f"--chat-template {self.chat_template}: no such file")
        return missing + bounds + self._cluster_problems(len(specs)) + self._kv_problems()

    def sequence_ids(self) -> int:
        """llama.cpp sequence ids: one per running sample, plus one per cached prefix.

        In the unified cache an id costs nothing, so there is one for each sample of a
        request with the largest n; with a stream of cells per id, --parallel ones (a
        request with more samples runs them in turns)."""
        from fireside.api.protocol import MAX_N

        running = max(self.parallel, MAX_N) if self.kv_unified else self.parallel
        return min(MAX_SEQUENCES, running + self.prefix_cache)

    def cells_per_sequence(self) -> int:
        """KV cells one sequence id may hold (before the model's training context caps
        it): --ctx-size, or its share of it, rounded up as llama.cpp does."""
        if self.kv_unified:
            return self.ctx_size
        return -(-max(self.ctx_size // self.sequence_ids(), 1) // 256) * 256

    def _kv_problems(self) -> list[str]:
        if not self.deterministic:
            return []
        if self.kv_unified:
            return ["--deterministic needs a stream of KV cells per sequence: drop --kv-unified"]
        if self.cells_per_sequence() >= MIN_DETERMINISTIC_CELLS:
            return []
        need = MIN_DETERMINISTIC_CELLS * self.sequence_ids()
        return [
            f"--deterministic gives each of {self.sequence_ids()} sequence ids "
            f"{self.cells_per_sequence()} KV cells; give --ctx-size {need} or more "
            "(or fewer --prefix-cache entries)"
        ]

    def _cluster_problems(self, num_models: int) -> list[str]:
        if not self.replicas:
            return [
                f"{flag} needs --replicas"
                for flag, value in (("--ray-address", self.ray_address),)
                if value
            ]
        problems = []
        if num_models > 1:
            problems.append("--replicas serves one --model (run one cluster app per model)")
        if self.mmproj:
            problems.append("--mmproj is not available with --replicas (images stay local)")
        return problems


def _out_of_bounds(config: ServeConfig, field: dataclasses.Field[Any]) -> str | None:
    meta = field.metadata
    value = getattr(config, field.name)
    low, high = meta.get("low"), meta.get("high")
    if meta.get("positive") and not value > 0:
        return f"{meta['flag']} must be positive"
    if low is not None and high is not None and not low <= value <= high:
        return f"{meta['flag']} must be in {low}..{high}"
    if low is not None and high is None and value < low:
        return f"{meta['flag']} must be " + ("0 or more" if low == 0 else f"at least {low}")
    return None
