"""How cost grows: output tok/s, TTFT and inter-token latency against concurrency and
prompt length, and resident memory against concurrency (issue 13).

    python benchmarks/sweep.py --threads 2 [--kinds fireside llama-server] \\
        [--concurrency 1 2 4 8 16 32 64] [--prompt-lengths 128 256 512 1024 2048 4096] \\
        [--out docs/sweep.json] [--charts docs/] [--merge docs/sweep.json]

For each server kind, one fresh server per point (cold caches), `fireside bench`
with unique prompts and 128 tokens out (ignore_eos): the concurrency sweep with
~200-token prompts and as many requests as streams (at least 4), the prompt-length
sweep at concurrency 4 with 8 requests. Resident memory is the server process's
peak VmHWM (from /proc) after the point. llama-server is the one
compare_llama_server.py builds (skipped, with a note, when it is not built: pass
--kinds fireside). Writes a Markdown table to stdout, the numbers as JSON
(--out), and PNG charts (--charts; needs matplotlib: pip install
'fireside[bench]'). One server runs at a time. Not run by the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compare_llama_server import BENCH_VENV, start, stop  # same folder

from fireside.bench import Workload, run
from fireside.models import default_model_path


@dataclass(frozen=True)
class Point:
    axis: str  # "concurrency" or "prompt_tokens"
    value: int
    workload: Workload


def points(concurrencies: list[int], lengths: list[int]) -> list[Point]:
    out = [
        Point("concurrency", c, Workload(concurrency=c, requests=max(4, c), prompt_tokens=200))
        for c in concurrencies
    ]
    out += [
        Point("prompt_tokens", n, Workload(concurrency=4, requests=8, prompt_tokens=n))
        for n in lengths
    ]
    return out


def peak_rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def measure(kind: str, model: str, threads: int, point: Point) -> dict[str, Any]:
    w = point.workload
    # Room for every stream's prompt and output: llama-server gives each slot ctx/np.
    ctx = max(16384, w.concurrency * (w.prompt_tokens + w.output_tokens + 64))
    proc, url = start(kind, model, threads, parallel=max(w.concurrency, 1), ctx=ctx)
    try:
        summary = asyncio.run(run(url, "bench", w)).summary()
        summary["peak_rss_mib"] = peak_rss_mib(proc.pid)
    finally:
        stop(proc)
    return summary


def table(results: dict[str, dict[str, dict[str, Any]]], axis: str) -> str:
    kinds = list(results)
    values = sorted(
        {int(k.split("=")[1]) for r in results.values() for k in r if k.startswith(axis)}
    )
    head = f"| {axis} | " + " | ".join(
        f"{k} tok/s | {k} TTFT p50 / p99 s | {k} ITL p99 ms | {k} RSS MiB" for k in kinds
    )
    lines = [head + " |", "|" + "---|" * (1 + 4 * len(kinds))]
    for v in values:
        cells = [str(v)]
        for k in kinds:
            s = results[k].get(f"{axis}={v}", {})
            if "output_tok_s" not in s:
                cells += ["-"] * 4
                continue
            ttft = s["ttft_s"]
            cells += [
                f"{s['output_tok_s']:.1f}",
                f"{ttft.get('p50', 0):.2f} / {ttft.get('p99', 0):.2f}",
                f"{s['itl_ms'].get('p99', 0):.0f}",
                f"{s['peak_rss_mib']:.0f}" if s.get("peak_rss_mib") else "-",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def charts(results: dict[str, dict[str, dict[str, Any]]], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    panels = [
        ("output tok/s", lambda s: s["output_tok_s"]),
        ("TTFT p50 (s)", lambda s: s["ttft_s"].get("p50")),
        ("TTFT p99 (s)", lambda s: s["ttft_s"].get("p99")),
        ("inter-token p99 (ms)", lambda s: s["itl_ms"].get("p99")),
    ]
    for axis, label in (("concurrency", "concurrent streams"), ("prompt_tokens", "prompt tokens")):
        extra = (
            [("peak RSS (MiB)", lambda s: s.get("peak_rss_mib"))] if axis == "concurrency" else []
        )
        fig, axes = plt.subplots(
            1, len(panels) + len(extra), figsize=(4 * (len(panels) + len(extra)), 3.4)
        )
        for ax, (title, get) in zip(axes, panels + extra, strict=True):
            for kind, by_point in results.items():
                xs, ys = [], []
                for key, s in sorted(by_point.items(), key=lambda kv: int(kv[0].split("=")[1])):
                    if key.startswith(axis) and "output_tok_s" in s and get(s) is not None:
                        xs.append(int(key.split("=")[1]))
                        ys.append(get(s))
                ax.plot(xs, ys, marker="o", label=kind)
            ax.set_xscale("log", base=2)
            ax.set_xlabel(label)
            ax.set_title(title)
            ax.grid(alpha=0.3)
        axes[0].legend()
        fig.tight_layout()
        path = folder / f"sweep_{axis}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kinds", nargs="+", default=["fireside", "llama-server"])
    ap.add_argument("--concurrency", nargs="*", type=int, default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument(
        "--prompt-lengths", nargs="*", type=int, default=[128, 256, 512, 1024, 2048, 4096]
    )
    ap.add_argument(
        "--merge",
        default=None,
        help="start from the points of this JSON (an earlier --out); the new ones replace theirs",
    )
    ap.add_argument("--out", default=None, help="write the numbers as JSON here")
    ap.add_argument("--charts", default=None, help="write PNG charts into this folder")
    a = ap.parse_args()
    kinds = ["fireside-same-file" if k == "fireside" else k for k in a.kinds]
    built = os.environ.get("LLAMA_SERVER") or (BENCH_VENV / "bin" / "python").exists()
    if "llama-server" in kinds and not built:
        print("llama-server is not built (benchmarks/compare_llama_server.py builds it): skipped")
        kinds.remove("llama-server")
    model = str(default_model_path())
    results: dict[str, dict[str, dict[str, Any]]] = {k: {} for k in kinds}
    if a.merge:
        for kind, by_point in json.loads(Path(a.merge).read_text()).items():
            results.setdefault(kind, {}).update(by_point)
    for point in points(a.concurrency, a.prompt_lengths):
        for kind in kinds:
            try:
                summary = measure(kind, model, a.threads, point)
            except Exception as exc:  # a failing point is a result too
                summary = {"error": repr(exc)}
            results[kind][f"{point.axis}={point.value}"] = summary
            shown = {
                k: summary.get(k) for k in ("output_tok_s", "ttft_s", "itl_ms", "peak_rss_mib")
            }
            print(f"{kind:>19} {point.axis}={point.value}: {json.dumps(shown)}", flush=True)
    print()
    print(table(results, "concurrency"))
    print()
    print(table(results, "prompt_tokens"))
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))
    if a.charts:
        for path in charts(results, Path(a.charts)):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
