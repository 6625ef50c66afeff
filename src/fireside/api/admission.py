"""Admission: how many engine requests may wait for each model (429 beyond that).

A request's engine requests count as waiting from the moment it is planned, not
only once the engine has them: planning awaits (grammar, tokenizing, images), and
without this a burst would pass the check all at once. A plan holds its places
in a `QueueHold` until its engine requests are submitted.
"""

from __future__ import annotations

import weakref
from types import TracebackType

from fireside.api.errors import APIError
from fireside.engine.client import EngineClient


class QueueHold:
    """Queue places held for one plan's engine requests until the engine has them.

    A context manager around the submission: leaving the block gives the places
    back (once; later releases do nothing). A plan dropped unrun (its client left
    first) takes its hold with it, since `Admission` counts only the holds alive.
    """

    __slots__ = ("_admission", "model", "num_requests", "__weakref__")

    def __init__(self, admission: Admission, model: str, num_requests: int) -> None:
        self._admission = admission
        self.model = model
        self.num_requests = num_requests

    def release(self) -> None:
        self._admission.release(self)

    def __enter__(self) -> QueueHold:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


class Admission:
    """The waiting-queue bound of every model, counting planned requests too."""

    def __init__(self, max_waiting: int) -> None:
        self.max_waiting = max_waiting  # engine requests waiting beyond this: 429
        self._holds: weakref.WeakSet[QueueHold] = weakref.WeakSet()

    def num_held(self, model: str) -> int:
        """Engine requests planned for `model` and not yet submitted."""
        return sum(hold.num_requests for hold in self._holds if hold.model == model)

    def check_room(self, model: str, engine: EngineClient, num_requests: int) -> None:
        """429 unless `num_requests` more fit in `model`'s waiting queue."""
        waiting = engine.stats().num_waiting_requests + self.num_held(model)
        if waiting + num_requests > self.max_waiting:
            # A rough wait: the queue drains at a few requests per second on a CPU.
            raise APIError.overloaded(retry_after_s=min(60, 1 + waiting // 8))

    def hold(self, model: str, num_requests: int) -> QueueHold:
        """Places for a plan's engine requests, counted as waiting until released."""
        hold = QueueHold(self, model, num_requests)
        self._holds.add(hold)
        return hold

    def release(self, hold: QueueHold) -> None:
        self._holds.discard(hold)
