"""Server settings: the one place a default lives. The command line reads its defaults here."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    # --model: "PATH" or "NAME=PATH", repeatable; none serves the embedded SmolLM2-135M-Instruct.
    models: tuple[str, ...] = ()
    mmproj: tuple[str, ...] = ()  # "PATH" (the only model's) or "NAME=PATH": vision projectors
    aliases: tuple[str, ...] = ()  # "ALIAS=NAME": more ids for a loaded model
    max_image_bytes: int = 10 * 2**20  # per image, decoded
    model_name: str | None = None  # the id clients send; defaults to the file's name
    api_keys: tuple[str, ...] = field(default_factory=tuple)
    ctx_size: int = 8192  # KV cells shared by all sequences; also caps one request's context
    parallel: int = 16  # sequences decoding at once
    threads: int = 0  # llama.cpp threads; 0 = the cores this process may use
    batch_size: int = 512  # most tokens per engine step (llama.cpp n_batch)
    default_max_tokens: int = 16
    # For requests that do not send `include_stop_str_in_output`: true keeps the stop
    # string in the text (the source document's rule), false drops it (OpenAI's).
    include_stop_str_in_output: bool = True
    flash_attn: bool = True  # measured: 219 vs 124 tok/s at 16 streams, 2 threads
    # original: the file as given (the default: the model's own numbers); auto converts
    # slow formats (Q4_1) to Q8_0, faster on CPU but logprobs move (issue 11: 0.16 nats
    # mean, 0.65 max on lm-eval loglikelihoods); q8_0; q4_0.
    weights: str = "original"
    cache_dir: str | None = None  # converted weights; None: $FIRESIDE_CACHE_DIR or ~/.cache
    prefill_chunk: int = 512  # prompt tokens per step while other streams decode (scheduler.py)
    max_waiting: int = 256  # requests queued beyond the running ones; more get 429
    request_timeout: float = 600.0  # seconds; a request running longer is stopped
    shutdown_grace: float = 30.0  # seconds running requests get to finish on SIGTERM
    prefix_cache: int = 32  # finished sequences whose KV is kept for reuse; 0 turns it off
    log_level: str = "info"

    # llama.cpp needs a sequence id per sample, and one request may ask for n=128.
    max_n: int = 128
