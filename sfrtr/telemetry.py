"""Metrics on the OpenTelemetry API, from the counters the manager keeps anyway.

``pip install 'sfrtr[otel]'`` and call :func:`instrument` once per manager. The
counters are *observable*: the manager keeps counting in its plain
:class:`~sfrtr.ManagerStats` fields (an integer increment on the refresh path,
nothing on the hot path), and the OpenTelemetry SDK reads them when it
exports. So metrics on cost nothing between exports, and metrics off (the
extra absent, or :func:`instrument` never called) cost nothing at all: this
module is not even imported.

Attributes carry no customer (a fleet's customers would explode a metric's
cardinality, and a customer name may be sensitive) and never a token.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sfrtr.errors import MissingExtra

if TYPE_CHECKING:
    from sfrtr.manager import TokenManager

# ManagerStats field -> the outcome it counts, on ``sfrtr.refreshes``.
OUTCOMES = {
    "redemptions": "redeemed",
    "adopted": "adopted",
    "rescued": "rescued",
    "rescues_adopted": "rescue_adopted",
    "reclaimed": "reclaimed",
}


@dataclass(frozen=True)
class Instruments:
    """The instruments :func:`instrument` registered (kept so they stay alive)."""

    refreshes: Any
    waits: Any
    recoveries: Any
    reauthorizations: Any


def instrument(manager: TokenManager, *, meter_provider: Any = None,
               worker_attribute: bool = False) -> Instruments:
    """Register ``manager``'s counters with OpenTelemetry.

    - ``sfrtr.refreshes`` (attribute ``outcome``: redeemed, adopted, rescued,
      rescue_adopted, reclaimed): how this process's refreshes ended. ``redeemed``
      is a refresh token this process presented; ``adopted`` a newer token another
      worker had stored.
    - ``sfrtr.waits``: times a refresh waited for another worker's.
    - ``sfrtr.recoveries``: ambiguous outcomes this process recovered.
    - ``sfrtr.reauthorizations``: grants this process marked dead.

    ``meter_provider``: the SDK's provider (default: the global one).
    ``worker_attribute``: add ``worker`` (host:pid:random) to every point.
    """
    try:
        from opentelemetry import metrics
        from opentelemetry.metrics import CallbackOptions, Observation
    except ImportError:
        raise MissingExtra("sfrtr.telemetry", "otel", "opentelemetry") from None
    from sfrtr import __version__

    meter = (meter_provider or metrics.get_meter_provider()).get_meter("sfrtr", __version__)
    stats = manager.stats
    base = {"worker": manager.worker_id} if worker_attribute else {}

    def refreshes(options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(getattr(stats, field), {**base, "outcome": outcome})
                for field, outcome in OUTCOMES.items()]

    def one(field: str) -> Any:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(getattr(stats, field), base)]
        return observe

    return Instruments(
        refreshes=meter.create_observable_counter(
            "sfrtr.refreshes", [refreshes], unit="{refresh}",
            description="How this process's refreshes ended, by outcome"),
        waits=meter.create_observable_counter(
            "sfrtr.waits", [one("waits")], unit="{wait}",
            description="Refreshes that waited for another worker's"),
        recoveries=meter.create_observable_counter(
            "sfrtr.recoveries", [one("recoveries")], unit="{recovery}",
            description="Ambiguous refresh outcomes this process recovered"),
        reauthorizations=meter.create_observable_counter(
            "sfrtr.reauthorizations", [one("reauth_marked")], unit="{grant}",
            description="Grants this process marked as needing re-authorization"),
    )
