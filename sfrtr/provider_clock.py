"""The provider's clock as this process can bound it, from the answers it got.

Salesforce stamps each token answer with ``issued_at``. A request sent at
local time ``s`` and answered by local time ``r`` says that the local clock
minus the provider's lies in ``[s - issued_at, r - issued_at]``: the lower
bound is exact up to the uplink and processing time, the upper bound up to the
downlink and anything that delayed reading the answer (a paused or starved
process). Each answer narrows the interval.

The local clock here is the *monotonic* one, never the wall clock: a wall clock
that steps (NTP, an operator, a VM restored) after an answer was learnt would
shift every estimate by the step, and a start time written for other workers to
judge a reuse window by would be off by as much (the simulation found exactly
that: a worker whose wall clock jumped wrote an intent that looked younger than
it was, and another presented its token again outside the window). Before the
first answer there is no offset to apply, and the wall clock stands in.

Which end to use depends on what is at stake: expiry estimates use the
middle; a reuse window must be judged with the provider's clock as *late* as
it can be (its age as long as it can be), and a start time written for
others to judge by as *early* as it can be.
"""

from __future__ import annotations

import time


class ProviderClock:
    """Bounds on (local monotonic clock - provider clock), seconds."""

    __slots__ = ("high", "low")

    def __init__(self) -> None:
        self.low: float | None = None
        self.high: float | None = None

    @property
    def known(self) -> bool:
        return self.low is not None

    @staticmethod
    def local() -> float:
        """The local clock answers are timed with (``learn``'s ``sent``/``received``)."""
        return time.monotonic()

    def learn(self, sent: float, received: float, issued_at: float) -> None:
        """One answer: sent at local (monotonic) ``sent``, read at ``received``, stamped
        ``issued_at`` by the provider (epoch seconds)."""
        low, high = sent - issued_at, received - issued_at
        if self.low is None or self.high is None or low > self.high or high < self.low:
            # First sample, or the provider's clock stepped (the bounds disagree).
            self.low, self.high = low, high
        else:
            self.low, self.high = max(self.low, low), min(self.high, high)

    def now(self) -> float:
        """The best estimate of the provider's time (for expiry)."""
        if self.low is None or self.high is None:
            return time.time()
        return time.monotonic() - (self.low + self.high) / 2

    def latest(self) -> float:
        """The provider's time as late as it can be (ages as long as they can be)."""
        if self.low is None:
            return time.time()
        return time.monotonic() - self.low

    def earliest(self) -> float:
        """The provider's time as early as it can be (starts as early as they can be)."""
        if self.high is None:
            return time.time()
        return time.monotonic() - self.high
