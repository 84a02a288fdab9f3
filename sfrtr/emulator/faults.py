"""Faults the emulator can inject, switchable at run time per endpoint.

An endpoint is named by a short key: ``token``, ``introspect``, ``revoke`` or
``api`` (every REST call). Each fault is independent; a request draws its
fate once, in a fixed order (reset, error, latency, then the answer with
its optional drop or drip), so a test can reason about what the server did.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields

ENDPOINTS = ("token", "introspect", "revoke", "api")


@dataclass
class Faults:
    """The faults of one endpoint. All off by default."""

    latency: float = 0.0
    """Seconds every request spends being processed (inside the critical section)."""
    jitter: float = 0.0
    """Extra uniform random seconds in ``[0, jitter]`` added to ``latency``."""
    error_rate: float = 0.0
    """Probability of answering ``error_status`` before doing any work."""
    error_status: int = 503
    reset_before: int = 0
    """Number of upcoming requests whose connection is closed before processing."""
    drop_after_rotation: int = 0
    """Number of upcoming token refreshes that rotate, then close without answering."""
    drip_delay: float = 0.0
    """Seconds between the bytes of a slowly dripped answer (0: no drip)."""

    def update(self, **changes: object) -> None:
        known = {f.name: f.type for f in fields(self)}
        for name, value in changes.items():
            if name not in known:
                raise ValueError(f"unknown fault {name!r}")
            if name in ("reset_before", "drop_after_rotation", "error_status"):
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise ValueError(f"fault {name!r} needs a non-negative integer")
            else:
                if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                    raise ValueError(f"fault {name!r} needs a non-negative number")
                if name == "error_rate" and value > 1:
                    raise ValueError("error_rate is a probability in [0, 1]")
            setattr(self, name, value)

    def delay(self, rng: random.Random) -> float:
        return self.latency + (rng.uniform(0, self.jitter) if self.jitter else 0.0)

    def take_reset(self) -> bool:
        if self.reset_before > 0:
            self.reset_before -= 1
            return True
        return False

    def take_drop(self) -> bool:
        if self.drop_after_rotation > 0:
            self.drop_after_rotation -= 1
            return True
        return False

    def draw_error(self, rng: random.Random) -> bool:
        return self.error_rate > 0 and rng.random() < self.error_rate

    def as_dict(self) -> dict[str, float | int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class FaultBoard:
    """The faults of every endpoint, addressed by name."""

    def __init__(self) -> None:
        self._by_endpoint = {name: Faults() for name in ENDPOINTS}

    def __getitem__(self, endpoint: str) -> Faults:
        try:
            return self._by_endpoint[endpoint]
        except KeyError:
            raise ValueError(f"unknown endpoint {endpoint!r}; known: {ENDPOINTS}") from None

    def set(self, endpoint: str, **changes: object) -> None:
        self[endpoint].update(**changes)

    def clear(self) -> None:
        self._by_endpoint = {name: Faults() for name in ENDPOINTS}

    def as_dict(self) -> dict[str, dict[str, float | int]]:
        return {name: f.as_dict() for name, f in self._by_endpoint.items()}
