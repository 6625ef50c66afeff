"""Where a served step's time goes: one workload against a fresh Fireside server, with
every thread's CPU time and, with --py-spy, a sampled breakdown (issue 13).

    python benchmarks/profile.py --threads 2 [--workload W1] [--py-spy] \\
        [--fireside-flags=--kv-unified] [--raw-out w1.txt]

Runs the workload of compare_llama_server.py (the embedded file as given, the same
server flags) and prints:

- CPU seconds of each thread of the server process over the run, as a share of the
  wall time: the event loop is the process's main thread; the others with CPU time are
  llama.cpp's (the engine thread, which also runs the engine's Python between
  `llama_decode` calls, and OpenMP's workers, which spin between them).
- With --py-spy (py-spy from PyPI: pip install 'fireside[bench]'), samples of the
  engine thread and the event loop (`py-spy record --native --idle`): the engine
  thread's time by llama.cpp operator and by the Python around it, the event loop's by
  what it was doing (idle in epoll, writing sockets, the API's Python). py-spy stops
  the process for each sample, so the run is slower than without it: read shares, not
  rates.

One server at a time, nothing else running. Not run by the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import compare_llama_server as compare  # same folder

from fireside.bench import run
from fireside.models import default_model_path


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of `pid`."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue  # the thread ended
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def engine_category(frames: list[str]) -> str:
    """What the engine thread was doing in one sample."""
    ops = [f for f in frames if f.startswith("ggml_compute_forward_")]
    if ops:
        return "llama.cpp compute: " + ops[0].split(" (")[0].removeprefix("ggml_compute_forward_")
    if any(f.startswith("GOMP_parallel") for f in frames):
        return "llama.cpp compute: other (scheduling, barriers)"
    if any(f.startswith("llama_decode") for f in frames):
        return "llama_decode outside the graph (batch split, graph build)"
    python = [f.split(" (")[0] for f in frames if ".py:" in f]
    if python and python[-1] == "Condition.wait":
        return "waiting for work"
    for marker, label in (
        ("build_batch", "engine: batch build"),
        ("_sample", "engine: sampling"),
        ("_verify", "engine: sampling"),
        ("postprocess", "engine: outputs, detokenizing, stop checks"),
        ("publish", "engine: handing outputs to the event loop"),
        ("Scheduler.", "engine: scheduler"),
        ("KVCache.", "engine: scheduler"),
    ):
        if any(marker in f for f in python):
            return label
    return "engine: other Python"


def loop_category(frames: list[str]) -> str:
    """What the event loop was doing in one sample."""
    leaf = frames[-1]
    if leaf.startswith(("epoll_wait", "epoll_pwait")) or "select" in leaf.split(" (")[0]:
        return "idle (waiting in epoll)"
    if any("write" in f.split(" (")[0].lower() for f in frames[-4:]):
        return "socket writes"
    python = " ".join(frames)
    if "json" in python.lower():
        return "JSON encoding"
    if "fireside/api" in python:
        return "API Python (chunks, choices, logs, metrics)"
    if "uvicorn" in python or "starlette" in python or "fastapi" in python:
        return "HTTP framework (uvicorn, Starlette)"
    return "event loop other"


def breakdown(raw: Path) -> dict[str, collections.Counter[str]]:
    """py-spy's raw (collapsed) samples by thread and category."""
    by_thread: dict[str, collections.Counter[str]] = {
        "engine thread": collections.Counter(),
        "event loop": collections.Counter(),
    }
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if "fireside-engine" in frames[0]:
            by_thread["engine thread"][engine_category(frames[1:])] += int(count)
        elif "MainThread" in frames[0]:
            by_thread["event loop"][loop_category(frames[1:])] += int(count)
    return by_thread


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workload", choices=list(compare.WORKLOADS), default="W1")
    ap.add_argument("--py-spy", action="store_true", help="also sample the stacks (py-spy)")
    ap.add_argument("--rate", type=int, default=50, help="py-spy samples per second")
    ap.add_argument("--fireside-flags", default="", help="more `fireside serve` flags")
    ap.add_argument("--raw-out", default=None, help="keep py-spy's raw samples here")
    a = ap.parse_args()
    compare.FIRESIDE_FLAGS = tuple(a.fireside_flags.split())
    title, w = compare.WORKLOADS[a.workload]
    spy_bin = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if a.py_spy and not Path(spy_bin).exists():
        print("py-spy is not installed: pip install 'fireside[bench]'")
        return 2
    model = str(default_model_path())
    proc, url = compare.start(
        "fireside-same-file", model, a.threads, parallel=max(w.concurrency * w.n, 1)
    )
    raw = Path(a.raw_out or Path(tempfile.mkdtemp()) / "samples.txt")
    spy = None
    try:
        if a.py_spy:
            cmd = [spy_bin, "record", "--native", "--idle", "--threads", "--format", "raw"]
            cmd += ["-r", str(a.rate), "-o", str(raw), "-p", str(proc.pid)]
            spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # attached before the load starts
        before, started = thread_cpu(proc.pid), time.monotonic()
        summary = asyncio.run(run(url, "bench", w)).summary()
        wall, after = time.monotonic() - started, thread_cpu(proc.pid)
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its samples on SIGINT
            spy.wait(timeout=60)
    finally:
        compare.stop(proc)
    print(f"{a.workload}: {title}")
    print(f"  {summary['output_tok_s']} output tok/s, wall {wall:.1f} s, {a.threads} threads")
    print("  CPU time of the server's threads over the run (share of wall time):")
    used = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
    for tid, cpu in sorted(used.items(), key=lambda kv: -kv[1]):
        if cpu >= 0.01 * wall:
            role = "event loop" if tid == proc.pid else "llama.cpp (engine thread or OpenMP)"
            print(f"    thread {tid:>7} {role:>36}: {cpu:6.1f} s  {100 * cpu / wall:5.1f}%")
    total = sum(used.values())
    cores = os.cpu_count() or 1
    print(f"    all threads: {total:.1f} of {cores * wall:.1f} core-seconds")
    if spy is not None and raw.exists():
        for thread, counts in breakdown(raw).items():
            n = sum(counts.values())
            print(f"  {thread}: {n} samples")
            for category, k in counts.most_common(12):
                print(f"    {100 * k / n:5.1f}%  {category}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
