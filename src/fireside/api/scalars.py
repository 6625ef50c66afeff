"""Constrained scalars of the response shapes.

The bounds are pydantic `Field` constraints, so they are the schemas' too: the
document says what the code builds (see `responses.py`).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, NonNegativeFloat, NonNegativeInt

TokenId = Annotated[int, Field(ge=0)]
Byte = Annotated[int, Field(ge=0, le=255)]
Logprob = Annotated[float, Field(le=0)]  # log-softmax, so never above 0
Seconds = NonNegativeFloat
Count = NonNegativeInt
PositiveCount = Annotated[int, Field(ge=1)]

__all__ = ["Byte", "Count", "Logprob", "PositiveCount", "Seconds", "TokenId"]
