"""The prefix-aware request router: a prompt goes to the replica that holds its prefix.

It runs inside the ingress's deployment handle (Ray Serve's `RequestRouter` API)
and decides from what it already knows, with no call per request:

- each replica's report (`EngineReplica.record_routing_stats`, every second): the
  block hashes (`prefix.py`) of the prompts in its prefix cache and of those it is
  running, so an eviction on the replica reaches the router within a report;
- what the router itself sent where in the last `PREDICTION_TTL_S` (the report
  has not caught up with those yet);
- load: the requests the router has sent a replica and that have not completed,
  counted the moment it chooses (reports arrive seconds late through Serve's
  controller; a burst must spread before that).

Order of preference: the replica an affinity key (`prompt_cache_key`, else `user`)
went to before; else the replica holding the longest prefix of the prompt's
blocks; else (no match, or the preferred replica has `imbalance` more requests in
flight than the least loaded one) the least loaded replica. The rest follow by
load, so Serve moves on to them when the first one's queue is full.

Ray's own `PrefixCacheAffinityRouter` matches prompt text (token-id prompts do
not route), keeps a tree in a separate actor that it queries with blocking calls
on every request, and never hears about a replica's evictions; this one matches
token blocks, keeps its state in the router, and learns evictions from reports.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import weakref
from collections import OrderedDict
from typing import Any

from ray.serve.request_router import (
    PendingRequest,
    ReplicaID,
    ReplicaResult,
    RequestRouter,
    RunningReplica,
)

from fireside.cluster.prefix import block_hashes, matched_blocks
from fireside.engine.types import EngineRequest

log = logging.getLogger("fireside.cluster")

# How long the router trusts its own record of where it sent a prefix: a few report
# periods, after which the replica's report says whether it still holds it.
PREDICTION_TTL_S = 10.0
# Affinity keys remembered (least recently used forgotten first).
MAX_AFFINITY_KEYS = 100_000


def engine_request(pending: PendingRequest | None) -> EngineRequest | None:
    if pending is None:
        return None
    for arg in pending.args:
        if isinstance(arg, EngineRequest):
            return arg
    return None


class PrefixAwareRouter(RequestRouter):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.imbalance = 16
        # replica -> requests sent there and not yet completed
        self._inflight: dict[ReplicaID, int] = {}
        # a pending request's future -> the replica chosen for it (until Serve says
        # where it went)
        self._chosen: dict[asyncio.Future[Any], ReplicaID] = {}
        # replica -> {block hash: when the router sent it there}
        self._sent: dict[ReplicaID, dict[int, float]] = {}
        # replica -> (the report's time, its hashes as a set)
        self._reported: dict[ReplicaID, tuple[float, frozenset[int]]] = {}
        self._affinity: OrderedDict[str, ReplicaID] = OrderedDict()
        # routing task -> the request it is choosing a replica for (gone with the task)
        self._routing: weakref.WeakKeyDictionary[asyncio.Task[Any], PendingRequest] = (
            weakref.WeakKeyDictionary()
        )

    def initialize_state(self, imbalance: int = 16, **kwargs: Any) -> None:
        """`request_router_kwargs`: `imbalance`, the extra requests in flight a replica
        may have over the least loaded one and still get its prefixes."""
        self.imbalance = imbalance

    # -- choosing ---------------------------------------------------------

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        loads = {r.replica_id: self._load(r) for r in candidate_replicas}
        by_load = sorted(candidate_replicas, key=lambda r: (loads[r.replica_id], random.random()))
        request = engine_request(pending_request)
        task = asyncio.current_task()
        if task is not None and pending_request is not None:
            self._routing[task] = pending_request
        first = by_load[0]
        if request is not None:
            first = self._preferred(request, by_load, loads) or first
            self._remember(first.replica_id, request)  # before the next request is routed
        if pending_request is not None:  # its load counts now, before the next choice
            future = pending_request.future
            self._move(self._chosen.get(future), first.replica_id)
            self._chosen[future] = first.replica_id
            for gone in [f for f in self._chosen if f.cancelled()]:  # the caller left
                self._move(self._chosen.pop(gone), None)
        log.debug(
            "route %s: loads %s -> %s",
            request.request_id if request is not None else None,
            {rid.unique_id: n for rid, n in loads.items()},
            first.replica_id.unique_id,
        )
        return [[first]] + [[r] for r in by_load if r is not first]

    def _preferred(
        self,
        request: EngineRequest,
        by_load: list[RunningReplica],
        loads: dict[ReplicaID, int],
    ) -> RunningReplica | None:
        least = loads[by_load[0].replica_id]

        def fits(r: RunningReplica) -> bool:
            return loads[r.replica_id] - least <= self.imbalance

        if request.cache_key is not None:
            rid = self._affinity.get(request.cache_key)
            for r in by_load:
                if r.replica_id == rid and fits(r):
                    self._affinity.move_to_end(request.cache_key)
                    return r
        hashes = block_hashes(request.prompt_token_ids, request.cache_isolation_key)
        if not hashes:
            return None
        now = time.monotonic()
        best, best_len = None, 0
        for r in by_load:  # least loaded first: of equal matches, it wins
            n = matched_blocks(hashes, self._held(r), self._recent(r.replica_id, now))
            if n > best_len and fits(r):
                best, best_len = r, n
        return best

    @staticmethod
    def _report_time(replica: RunningReplica | None) -> float:
        stats = (replica.routing_stats if replica is not None else None) or {}
        return float(stats.get("at", 0.0))

    def _load(self, replica: RunningReplica) -> int:
        return self._inflight.get(replica.replica_id, 0)

    def _held(self, replica: RunningReplica) -> frozenset[int]:
        at = self._report_time(replica)
        cached = self._reported.get(replica.replica_id)
        if cached is None or cached[0] != at:
            blocks = (replica.routing_stats or {}).get("blocks") or []
            cached = (at, frozenset(blocks))
            self._reported[replica.replica_id] = cached
        return cached[1]

    def _recent(self, rid: ReplicaID, now: float) -> dict[int, float]:
        sent = self._sent.get(rid)
        if not sent:
            return {}
        # Insertion order is time order (`_remember` re-inserts): drop from the front
        # while too old, and stop at the first that is not.
        while sent:
            oldest, at = next(iter(sent.items()))
            if now - at <= PREDICTION_TTL_S:
                break
            del sent[oldest]
        return sent

    def _remember(self, rid: ReplicaID, request: EngineRequest) -> None:
        now = time.monotonic()
        sent = self._sent.setdefault(rid, {})
        for h in block_hashes(request.prompt_token_ids, request.cache_isolation_key):
            sent.pop(h, None)
            sent[h] = now
        if request.cache_key is not None:
            self._affinity[request.cache_key] = rid
            self._affinity.move_to_end(request.cache_key)
            while len(self._affinity) > MAX_AFFINITY_KEYS:
                self._affinity.popitem(last=False)

    def _fulfill_next_pending_request(
        self, replica: RunningReplica, request_metadata: Any = None
    ) -> None:
        """Give the replica to the request it was chosen for. Serve's default matches
        the request by its internal id, which every handle call made while serving one
        HTTP request shares: the prompts of a multi-prompt request (or its n > 1
        prompts) would wait for each other's routing (measured: 10 s each)."""
        task = asyncio.current_task()
        pending = self._routing.pop(task, None) if task is not None else None
        if pending is None or pending.future.done():
            super()._fulfill_next_pending_request(replica, request_metadata)
            return
        self._cancel_routing_task_for_pending_request(pending)
        self._record_queue_wait_time(pending)
        pending.future.set_result(replica)
        self._remove_pending_request_from_indices(pending)

    # -- what happened ----------------------------------------------------

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult
    ) -> None:
        self._move(self._chosen.pop(pending_request.future, None), replica_id)
        request = engine_request(pending_request)
        if request is not None:  # the replica Serve really chose (its first one was full?)
            self._remember(replica_id, request)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._move(replica_id, None)

    def _move(self, src: ReplicaID | None, dst: ReplicaID | None) -> None:
        """One in-flight request counted at dst instead of src (None: nowhere)."""
        if src == dst:
            return
        if src is not None and self._inflight.get(src, 0) > 0:
            self._inflight[src] -= 1
        if dst is not None:
            self._inflight[dst] = self._inflight.get(dst, 0) + 1

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        alive = {r.replica_id for r in replicas}
        self._forget({rid for rid in (*self._inflight, *self._sent, *self._reported)} - alive)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._forget({replica_id})

    def _forget(self, gone: set[ReplicaID]) -> None:
        """Drop what the router knows of replicas that are gone."""
        for rid in gone:
            self._inflight.pop(rid, None)
            self._sent.pop(rid, None)
            self._reported.pop(rid, None)
        for key in [k for k, rid in self._affinity.items() if rid in gone]:
            del self._affinity[key]
