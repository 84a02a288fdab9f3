"""Metrics and traces on the OpenTelemetry API.

``pip install 'sfrtr[otel]'`` and call :func:`instrument` once per manager.

- **Counters** are *observable*: the manager keeps counting in its plain
  :class:`~sfrtr.ManagerStats` fields (an integer increment on the refresh
  path), and the SDK reads them when it exports.
- **Histograms**: the token requests' durations (``sfrtr.provider_call.duration``,
  by outcome) and how long callers without a fresh token waited
  (``sfrtr.caller_wait.duration``: ``token()``/``credentials()`` callers that
  joined a refresh, and every ``refresh()`` caller, the client's after a 401).
- **Spans**: ``sfrtr.refresh`` around a refresh flight (one per customer per
  refresh, however many callers share it) and ``sfrtr.provider_call`` around
  the token request inside it.

The hot path (a cached, fresh token) records nothing, instrumented or not.
Metrics off (the extra absent, or :func:`instrument` never called) cost
nothing at all: this module is not even imported. Attributes never carry a
token, and carry the customer only if ``customer_attribute=True`` (a fleet's
customers would explode a metric's cardinality, and a name may be sensitive):
spans then get ``sfrtr.customer``; metrics never do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
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
    observer: _OtelObserver


class _OtelObserver:
    """The manager's :class:`~sfrtr.hooks.Observer` on OpenTelemetry."""

    def __init__(self, meter: Any, tracer: Any, base: dict[str, str],
                 customer_attribute: bool) -> None:
        self._tracer = tracer
        self._base = base
        self._customer_attribute = customer_attribute
        self._calls = meter.create_histogram(
            "sfrtr.provider_call.duration", unit="s",
            description="Token requests (refreshes) by outcome")
        self._waits = meter.create_histogram(
            "sfrtr.caller_wait.duration", unit="s",
            description="How long a caller without a fresh token waited for one")

    @contextlib.contextmanager
    def span(self, name: str, customer: str) -> Iterator[object]:
        attributes = dict(self._base)
        if self._customer_attribute:
            attributes["sfrtr.customer"] = customer
        with self._tracer.start_as_current_span(name, attributes=attributes) as span:
            yield span

    def provider_call(self, seconds: float, outcome: str) -> None:
        self._calls.record(seconds, {**self._base, "outcome": outcome})

    def waited(self, seconds: float) -> None:
        self._waits.record(seconds, self._base)


def instrument(manager: TokenManager, *, meter_provider: Any = None,
               tracer_provider: Any = None, worker_attribute: bool = False,
               customer_attribute: bool = False) -> Instruments:
    """Register ``manager``'s counters with OpenTelemetry.

    - ``sfrtr.refreshes`` (attribute ``outcome``: redeemed, adopted, rescued,
      rescue_adopted, reclaimed): how this process's refreshes ended. ``redeemed``
      is a refresh token this process presented; ``adopted`` a newer token another
      worker had stored.
    - ``sfrtr.waits``: times a refresh waited for another worker's.
    - ``sfrtr.recoveries``: ambiguous outcomes this process recovered.
    - ``sfrtr.reauthorizations``: grants this process marked dead.

    Also the histograms and spans of the module's docstring.

    ``meter_provider``/``tracer_provider``: the SDK's providers (default: the
    global ones). ``worker_attribute``: add ``worker`` (host:pid:random) to every
    point and span. ``customer_attribute``: name the customer on spans.
    """
    try:
        from opentelemetry import metrics, trace
        from opentelemetry.metrics import CallbackOptions, Observation
    except ImportError:
        raise MissingExtra("sfrtr.telemetry", "otel", "opentelemetry") from None
    from sfrtr import __version__

    meter = (meter_provider or metrics.get_meter_provider()).get_meter("sfrtr", __version__)
    tracer = (tracer_provider or trace.get_tracer_provider()).get_tracer("sfrtr", __version__)
    stats = manager.stats
    base = {"worker": manager.worker_id} if worker_attribute else {}

    def refreshes(options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(getattr(stats, field), {**base, "outcome": outcome})
                for field, outcome in OUTCOMES.items()]

    def one(field: str) -> Any:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(getattr(stats, field), base)]
        return observe

    observer = _OtelObserver(meter, tracer, base, customer_attribute)
    manager.observe(observer)
    return Instruments(
        observer=observer,
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
