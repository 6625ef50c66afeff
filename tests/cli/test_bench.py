"""`fireside bench`'s workloads: what prompts it sends."""

from __future__ import annotations

import collections

from fireside.bench import Workload


def test_k_prefixes_each_start_an_equal_share_of_the_prompts_in_a_shuffled_order():
    w = Workload(requests=32, prompt_tokens=5, shared_prefix_tokens=50, prefixes=4)
    prompts = w.prompts()
    heads = [" ".join(p.split()[:50]) for p in prompts]
    counts = collections.Counter(heads)
    assert len(counts) == 4 and set(counts.values()) == {8}
    order = [sorted(counts).index(h) for h in heads]
    assert order != sorted(order)  # not grouped: a router cannot rely on arrival order
    assert len(set(prompts)) == 32  # every request has its own tail
    assert w.prompts() == prompts  # the same seed, the same prompts


def test_one_shared_prefix_is_the_default_workload():
    w = Workload(requests=4, prompt_tokens=5, shared_prefix_tokens=10)
    assert len({" ".join(p.split()[:10]) for p in w.prompts()}) == 1
