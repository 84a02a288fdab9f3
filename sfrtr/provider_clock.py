"""The provider's clock as this process can bound it, from the answers it got.

Salesforce stamps each token answer with ``issued_at``. A request sent at
local wall time ``s`` and answered by local time ``r`` says that the local
clock minus the provider's lies in ``[s - issued_at, r - issued_at]``: the
lower bound is exact up to the uplink and processing time, the upper bound
up to the downlink and anything that delayed reading the answer (a paused or
starved process). Each answer narrows the interval; an answer outside it
(the local clock stepped) starts it again.

Which end to use depends on what is at stake: expiry estimates use the
middle; a reuse window must be judged with the provider's clock as *late* as
it can be (its age as long as it can be), and a start time written for
others to judge by as *early* as it can be.
"""

from __future__ import annotations

import time


class ProviderClock:
    """Bounds on (local wall clock - provider clock), seconds."""

    __slots__ = ("high", "low")

    def __init__(self) -> None:
        self.low: float | None = None
        self.high: float | None = None

    @property
    def known(self) -> bool:
        return self.low is not None

    def learn(self, sent: float, received: float, issued_at: float) -> None:
        """One answer: sent at local ``sent``, read at local ``received``, stamped
        ``issued_at`` by the provider (all epoch seconds)."""
        low, high = sent - issued_at, received - issued_at
        if self.low is None or self.high is None or low > self.high or high < self.low:
            self.low, self.high = low, high  # first sample, or the local clock stepped
        else:
            self.low, self.high = max(self.low, low), min(self.high, high)

    def now(self) -> float:
        """The best estimate of the provider's time (for expiry)."""
        if self.low is None or self.high is None:
            return time.time()
        return time.time() - (self.low + self.high) / 2

    def latest(self) -> float:
        """The provider's time as late as it can be (ages as long as they can be)."""
        return time.time() - (self.low if self.low is not None else 0.0)

    def earliest(self) -> float:
        """The provider's time as early as it can be (starts as early as they can be)."""
        return time.time() - (self.high if self.high is not None else 0.0)
