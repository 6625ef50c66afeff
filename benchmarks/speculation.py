"""Speculative decoding: output tok/s with and without drafts (issue 14).

    python benchmarks/speculation.py --threads 2 [--only grounded open] [--out spec.json]
        [--max-running 1 2 4 8 16] [--llama-server] [--llama-spec-args "..."]

Two workloads on the embedded model, greedy, each at two concurrencies:

- grounded (c=1, c=4): the output mostly repeats the prompt: "copy this passage"
  (~200-token passages) and "fix the one wrong word in this code". Cases:
  `none` (no draft, `--speculate off`), `prediction` (`prediction` = the expected
  output: the passage, the fixed code), `own` (`speculation` = the model's own
  greedy output from a first pass: the best a draft can be), `wrong` (an unrelated
  text as `prediction`), `auto` (`--speculate auto`, no prediction: prompt lookup).
- open (c=1, c=16): open-ended stories, 128 tokens each (ignore_eos), with
  `--speculate auto` against `off`: what prompt lookup costs where it rarely helps.

Targets (the issue's): prediction >= 2.5x none, auto >= 1.5x none, wrong >= 0.95x
none, all at c=1; open auto >= 0.97x off at c=1 and c=16. `--max-running N...`
reruns the auto cases with `--speculate-max-running N` to find where prompt
lookup stops paying (the server's default is a guess until then).
`--llama-server` adds llama.cpp's own server on the same file, without and with
its n-gram speculation (`--llama-spec-args`; the flag names change between
llama.cpp versions: check `llama-server --help` of the one installed).

Each server is fresh (cold caches); every task is sent once with max_tokens 1
before timing, so each case then finds its prompt in the prefix cache alike.
Output tok/s is completion tokens over the wall time of the whole case. One
server runs at a time: two would compete for the cores. Not run by the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from compare_llama_server import start, stop  # same folder

from fireside.models import default_model_path

MODEL = "bench"

PASSAGES = [
    "The lighthouse stood at the edge of the cliff, its lamp turning slowly through the fog. "
    "Every night the keeper climbed the one hundred and twelve stairs, trimmed the wick, "
    "polished the great lens and wrote the weather in a small leather book. Ships passed far "
    "out at sea, and none of their crews ever knew his name, but each of them steered by the "
    "light he kept. In winter the storms came in from the west and the waves broke high "
    "against the rocks below, throwing spray up to the gallery rail. On calm summer evenings "
    "children from the village walked out along the path to watch the lamp come on, and the "
    "keeper would wave to them from the gallery before he went inside to start his watch.",
    "Bread is one of the oldest prepared foods. The simplest loaf needs only flour, water, "
    "salt and yeast, yet the same four ingredients can give a dense rye, a light white sandwich "
    "loaf or an open, chewy sourdough. The difference lies in the flour, in how long the dough "
    "is left to rise and at what temperature, and in how it is shaped and baked. A long, cool "
    "rise lets the yeast and bacteria develop more flavour, while a hot oven with steam in the "
    "first minutes gives the crust its colour and crackle. Bakers learn to judge the dough by "
    "its feel and smell as much as by the clock, and most of them say that the best way to "
    "learn is to bake the same loaf many times and change one thing at a time.",
    "The river begins as a spring high in the hills, a thin stream of cold water running over "
    "stones between the heather. It gathers other streams as it descends, and by the time it "
    "reaches the first village it is wide enough to turn a mill wheel. Below the village the "
    "valley opens out into farmland, and the river slows and bends through meadows where "
    "cattle graze in summer. Herons stand in the shallows waiting for fish, and kingfishers "
    "flash blue along the banks. Further down, the river passes under an old stone bridge with "
    "five arches, then widens again as it nears the town, where boats are moored along the "
    "quay and the water turns brown with the tide coming in from the estuary.",
    "A good field notebook is small enough to carry in a pocket and tough enough to survive "
    "rain. Write the date, the place and the weather at the top of every page before anything "
    "else, because these are the details you will most want later and the ones you are most "
    "likely to forget. Record what you see, not what you expect to see, and note how sure you "
    "are. Sketches are often more useful than words, even rough ones, and a few measurements "
    "make a sketch far more valuable. At the end of each day, read through what you wrote and "
    "add anything you missed while it is still fresh in your mind, then number the pages so "
    "that nothing can go missing without your noticing.",
]

CODE = [
    (
        "def mean(values):\n"
        '    """The arithmetic mean of a non-empty list."""\n'
        "    total = 0\n"
        "    for value in values:\n"
        "        total += value\n"
        "    return total / len(valeus)\n"
    ),
    (
        "def is_palindrome(text):\n"
        "    cleaned = [c.lower() for c in text if c.isalnum()]\n"
        "    left, right = 0, len(cleaned) - 1\n"
        "    while left < right:\n"
        "        if cleaned[left] != cleaned[right]:\n"
        "            return False\n"
        "        left += 1\n"
        "        right += 1\n"
        "    return True\n"
    ),
    (
        "def count_words(path):\n"
        "    counts = {}\n"
        "    with open(path) as f:\n"
        "        for line in f:\n"
        "            for word in line.split():\n"
        "                counts[word] = counts.get(word, 0) + 1\n"
        "    return sorted(counts.items(), key=lambda item: item[1], reverse=Flase)\n"
    ),
    (
        "class Stack:\n"
        "    def __init__(self):\n"
        "        self.items = []\n"
        "\n"
        "    def push(self, item):\n"
        "        self.items.append(item)\n"
        "\n"
        "    def pop(self):\n"
        "        if not self.items:\n"
        '            raise IndexError("pop from an empty stack")\n'
        "        return self.items.pop(0)\n"
    ),
]
FIXES = [("valeus", "values"), ("right += 1", "right -= 1"), ("Flase", "True"), ("pop(0)", "pop()")]

UNRELATED = (
    "Preheat the oven to two hundred degrees. Mix the flour, sugar and butter until the dough "
    "is smooth, then roll it out on a floured board and cut it into small squares. Bake them "
    "for twelve minutes, until the edges are golden, and leave them to cool on a rack before "
    "you dust them with sugar and pack them into a tin lined with paper."
)

STORY_TOPICS = [
    "a fox who learns to read",
    "the last train of the night",
    "a city where it never stops raining",
    "two rivals stuck in a lift",
    "a robot gardener",
    "a letter that arrives fifty years late",
    "the day the sea went quiet",
    "a chess match in a lighthouse",
]


def chat(user: str) -> str:
    """SmolLM2-Instruct's chat template, applied by hand (this is the completions API)."""
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


@dataclass
class Task:
    prompt: str
    expected: str  # what the output should be: the `prediction` of the `prediction` case
    max_tokens: int
    own: list[int] = field(default_factory=list)  # the model's greedy output, filled later


def grounded_tasks() -> list[Task]:
    tasks = [
        Task(chat(f"Copy this passage exactly, word for word:\n\n{p}"), p, 320) for p in PASSAGES
    ]
    for code, (wrong, right) in zip(CODE, FIXES, strict=True):
        prompt = chat(
            "This code has one wrong word. Reply with the whole code, fixed, and nothing "
            f"else.\n\n```python\n{code}```"
        )
        tasks.append(Task(prompt, f"```python\n{code.replace(wrong, right)}```", 200))
    return tasks


def open_tasks() -> list[Task]:
    return [Task(chat(f"Write a short story about {t}."), "", 128) for t in STORY_TOPICS]


# --- servers


def start_fireside(threads: int, parallel: int, *flags: str) -> tuple[subprocess.Popen, str]:
    return start("fireside-same-file", str(default_model_path()), threads, parallel, extra=flags)


def start_llama_server(
    threads: int, parallel: int, extra: list[str]
) -> tuple[subprocess.Popen, str]:
    return start("llama-server", str(default_model_path()), threads, parallel, extra=tuple(extra))


# --- one case


async def run_case(
    url: str,
    tasks: list[Task],
    concurrency: int,
    requests: int,
    draft: str,  # none, prediction, own, wrong
    ignore_eos: bool = False,
    fireside: bool = True,
) -> dict[str, Any]:
    """`requests` requests cycling through the tasks, `concurrency` at a time."""
    sem = asyncio.Semaphore(concurrency)
    totals = {"completion_tokens": 0, "errors": 0}
    spec = {"speculation-prompt-tokens": 0, "speculation-prompt-matched-tokens": 0}
    spec |= {"speculation-generated-tokens": 0, "speculation-accepted-tokens": 0}
    texts: list[list[int]] = [[] for _ in tasks]

    async with httpx.AsyncClient(base_url=url, timeout=900) as client:

        async def one(i: int) -> None:
            task = tasks[i % len(tasks)]
            body: dict[str, Any] = {
                "model": MODEL,
                "prompt": task.prompt,
                "max_tokens": task.max_tokens,
                "temperature": 0,
            }
            if ignore_eos:
                body["ignore_eos"] = True
            if fireside:
                body |= {"return_token_ids": True, "perf_metrics_in_response": True}
            if draft == "prediction":
                body["prediction"] = {"type": "content", "content": task.expected}
            elif draft == "own":
                body["speculation"] = task.own
            elif draft == "wrong":
                body["prediction"] = UNRELATED
            async with sem:
                r = await client.post("/v1/completions", json=body)
            if r.status_code != 200:
                totals["errors"] += 1
                return
            out = r.json()
            totals["completion_tokens"] += out["usage"]["completion_tokens"]
            if fireside:
                texts[i % len(tasks)] = out["choices"][0]["token_ids"]
                for key in spec:
                    spec[key] += out["perf_metrics"].get(key, 0)

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(requests)))
        wall = time.perf_counter() - started
    result: dict[str, Any] = {
        "wall_s": round(wall, 2),
        "output_tok_s": round(totals["completion_tokens"] / wall, 1),
        **totals,
    }
    if fireside:
        result |= spec
        result["_outputs"] = texts
    return result


async def warm(url: str, tasks: list[Task]) -> None:
    """Each prompt once, so every timed case finds it in the prefix cache alike."""
    async with httpx.AsyncClient(base_url=url, timeout=900) as client:
        for task in tasks:
            await client.post(
                "/v1/completions",
                json={"model": MODEL, "prompt": task.prompt, "max_tokens": 1, "temperature": 0},
            )


def measure(
    start: tuple[subprocess.Popen, str],
    tasks: list[Task],
    cases: list[tuple[str, int, int]],  # (draft, concurrency, requests)
    ignore_eos: bool = False,
    fireside: bool = True,
) -> dict[str, dict[str, Any]]:
    proc, url = start
    results = {}
    try:
        asyncio.run(warm(url, tasks))
        for draft, concurrency, requests in cases:
            key = f"{draft}@c{concurrency}"
            results[key] = asyncio.run(
                run_case(url, tasks, concurrency, requests, draft, ignore_eos, fireside)
            )
            shown = {k: v for k, v in results[key].items() if not k.startswith("_")}
            print(f"    {key:>16}: {json.dumps(shown)}", flush=True)
    finally:
        stop(proc)
    return results


# --- the workloads


def grounded(a: argparse.Namespace) -> dict[str, Any]:
    tasks = grounded_tasks()
    out: dict[str, Any] = {}
    per_c = {1: len(tasks), 4: 2 * len(tasks)}  # requests per concurrency

    print("\n== grounded: --speculate off", flush=True)
    off_cases = [(d, c, n) for c, n in per_c.items() for d in ("none", "prediction", "wrong")]
    off = measure(start_fireside(a.threads, 4, "--speculate", "off"), tasks, off_cases)
    for i, task in enumerate(tasks):  # the model's own output: the `own` draft
        task.own = off["none@c1"]["_outputs"][i]
    own = measure(
        start_fireside(a.threads, 4, "--speculate", "off"),
        tasks,
        [("own", c, n) for c, n in per_c.items()],
    )
    out["off"] = off | own

    for max_running in a.max_running or [None]:
        flags = ["--speculate", "auto"]
        label = "auto"
        if max_running is not None:
            flags += ["--speculate-max-running", str(max_running)]
            label = f"auto,max-running={max_running}"
        print(f"\n== grounded: {' '.join(flags)}", flush=True)
        auto = measure(
            start_fireside(a.threads, 4, *flags),
            tasks,
            [("none", c, n) for c, n in per_c.items()],
        )
        out[label] = auto

    if a.llama_server:
        for label, extra in (("llama-server", []), ("llama-server-ngram", a.llama_spec_args)):
            print(f"\n== grounded: {label} {shlex.join(extra)}", flush=True)
            out[label] = measure(
                start_llama_server(a.threads, 4, extra),
                tasks,
                [("none", c, n) for c, n in per_c.items()],
                fireside=False,
            )

    print("\n== grounded: output tok/s against no draft (targets at c=1)")
    for c in per_c:
        base = out["off"][f"none@c{c}"]["output_tok_s"]
        rows = [
            ("prediction = expected", out["off"][f"prediction@c{c}"], 2.5),
            ("speculation = own output", out["off"][f"own@c{c}"], None),
            ("wrong prediction", out["off"][f"wrong@c{c}"], 0.95),
        ]
        rows += [
            (f"{k}, no prediction", v[f"none@c{c}"], 1.5) for k, v in out.items() if "auto" in k
        ]
        rows += [(k, v[f"none@c{c}"], None) for k, v in out.items() if k.startswith("llama")]
        for name, r, target in rows:
            ratio = r["output_tok_s"] / base
            goal = f" (target >= {target}x)" if target is not None and c == 1 else ""
            accepted = r.get("speculation-accepted-tokens")
            acc = (
                f", {accepted}/{r.get('speculation-generated-tokens')} drafts kept"
                if accepted is not None
                else ""
            )
            print(f"  c={c} {name:>32}: {r['output_tok_s']:7.1f} tok/s = {ratio:4.2f}x{goal}{acc}")
    return out


def open_ended(a: argparse.Namespace) -> dict[str, Any]:
    tasks = open_tasks()
    per_c = {1: 4, 16: 32}
    out: dict[str, Any] = {}
    variants: list[tuple[str, list[str]]] = [("off", ["--speculate", "off"])]
    for max_running in a.max_running or [None]:
        flags = ["--speculate", "auto"]
        if max_running is None:
            variants.append(("auto", flags))
        else:
            variants.append(
                (
                    f"auto,max-running={max_running}",
                    [*flags, "--speculate-max-running", str(max_running)],
                )
            )
    for label, flags in variants:
        print(f"\n== open-ended: {' '.join(flags)}", flush=True)
        out[label] = measure(
            start_fireside(a.threads, 16, *flags),
            tasks,
            [("none", c, n) for c, n in per_c.items()],
            ignore_eos=True,
        )
    if a.llama_server:
        for label, extra in (("llama-server", []), ("llama-server-ngram", a.llama_spec_args)):
            print(f"\n== open-ended: {label} {shlex.join(extra)}", flush=True)
            out[label] = measure(
                start_llama_server(a.threads, 16, extra),
                tasks,
                [("none", c, n) for c, n in per_c.items()],
                ignore_eos=True,
                fireside=False,
            )
    print("\n== open-ended: output tok/s against --speculate off (target >= 0.97x)")
    for c in per_c:
        base = out["off"][f"none@c{c}"]["output_tok_s"]
        for label, by_case in out.items():
            tok_s = by_case[f"none@c{c}"]["output_tok_s"]
            print(f"  c={c:<2} {label:>28}: {tok_s:7.1f} tok/s = {tok_s / base:4.2f}x")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="+", choices=["grounded", "open"], default=["grounded", "open"])
    ap.add_argument(
        "--max-running",
        type=int,
        nargs="+",
        default=None,
        help="run the auto cases once per --speculate-max-running value (default: the server's)",
    )
    ap.add_argument(
        "--llama-server",
        action="store_true",
        help="add llama-server, without and with n-gram speculation",
    )
    ap.add_argument(
        "--llama-spec-args",
        type=shlex.split,
        default=shlex.split("--spec-type ngram-simple --draft-max 16"),
        help="llama-server's n-gram speculation flags (see its --help)",
    )
    ap.add_argument("--out", default=None, help="write all results as JSON here")
    a = ap.parse_args()
    results: dict[str, Any] = {}
    if "grounded" in a.only:
        results["grounded"] = grounded(a)
    if "open" in a.only:
        results["open"] = open_ended(a)
    if a.out:
        for by_server in results.values():
            for by_case in by_server.values():
                for r in by_case.values():
                    r.pop("_outputs", None)
        with open(a.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
