"""Metrics through the OpenTelemetry SDK, read from a real manager's refreshes against
the emulator; nothing registered, nothing imported, without instrument()."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sfrtr import MemoryStore, RefreshPolicy, TokenManager
from sfrtr.emulator import Emulator
from sfrtr.telemetry import instrument
from tests.conftest import emulator_grant, emulator_oauth

pytestmark = pytest.mark.anyio


def points(reader: InMemoryMetricReader) -> dict[tuple[str, tuple[tuple[str, Any], ...]], int]:
    data = reader.get_metrics_data()
    assert data is not None
    found = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name.endswith(".duration"):
                    continue  # histograms: see histograms()
                for point in metric.data.data_points:
                    found[(metric.name, tuple(sorted(point.attributes.items())))] = point.value
    return found


async def test_refresh_outcomes_are_counted(emulator: Emulator):
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    store = MemoryStore()
    first = TokenManager(emulator_oauth(emulator), store, RefreshPolicy())
    try:
        instrument(first, meter_provider=provider)
        await first.connect("acme", emulator_grant(emulator, "acme"))
        for _ in range(3):
            stale = await first.token("acme")
            await first.refresh("acme", stale=stale)
        found = points(reader)
        assert found[("sfrtr.refreshes", (("outcome", "redeemed"),))] == 3
        assert found[("sfrtr.refreshes", (("outcome", "adopted"),))] == 0
        assert found[("sfrtr.reauthorizations", ())] == 0
        assert emulator.ledger["redemptions"] == 3
    finally:
        await first.aclose()
        provider.shutdown()


async def test_a_worker_attribute_when_asked(emulator: Emulator):
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    manager = TokenManager(emulator_oauth(emulator), MemoryStore(), RefreshPolicy(),
                           worker_id="w-1")
    try:
        instrument(manager, meter_provider=provider, worker_attribute=True)
        found = points(reader)
        assert found[("sfrtr.waits", (("worker", "w-1"),))] == 0
        # No customer and no token, anywhere in the attributes.
        assert {k for key in found for k, _ in key[1]} <= {"worker", "outcome"}
    finally:
        await manager.aclose()
        provider.shutdown()


def test_without_instrument_opentelemetry_is_never_imported():
    code = ("import sys, asyncio, sfrtr\n"
            "async def main():\n"
            "    m = sfrtr.TokenManager(sfrtr.OAuthClient(sfrtr.OAuthConfig(client_id='x', "
            "client_secret=sfrtr.Secret('y'))), sfrtr.MemoryStore())\n"
            "    await m.aclose()\n"
            "asyncio.run(main())\n"
            "print(any(name.startswith('opentelemetry') for name in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=60)
    assert done.stdout.strip() == "False"


def histograms(reader: InMemoryMetricReader) -> dict[tuple[str, tuple[tuple[str, Any], ...]],
                                                       int]:
    data = reader.get_metrics_data()
    assert data is not None
    found = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name.endswith(".duration"):
                    for point in metric.data.data_points:
                        key = (metric.name, tuple(sorted(point.attributes.items())))
                        found[key] = point.count
    return found


@pytest.mark.parametrize("customer_attribute", [False, True])
async def test_spans_and_histograms_of_a_shared_refresh(emulator: Emulator,
                                                        customer_attribute: bool):
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    spans = InMemorySpanExporter()
    tracers = TracerProvider()
    tracers.add_span_processor(SimpleSpanProcessor(spans))
    manager = TokenManager(emulator_oauth(emulator), MemoryStore(), RefreshPolicy())
    try:
        instrument(manager, meter_provider=meters, tracer_provider=tracers,
                   customer_attribute=customer_attribute)
        await manager.connect("acme", emulator_grant(emulator, "acme"))
        stale = await manager.token("acme")
        for _ in range(50):  # the hot path: nothing recorded
            assert await manager.token("acme") == stale
        # Fifty callers after a 401 share one refresh: one flight, one token request.
        await asyncio.gather(*(manager.refresh("acme", stale=stale) for _ in range(50)))
        emulator.expire_sessions()
        manager._uncache("acme")  # the next caller has no fresh token: it waits
        await manager.token("acme")
        finished = spans.get_finished_spans()
        names = sorted(span.name for span in finished)
        assert names == ["sfrtr.provider_call", "sfrtr.refresh", "sfrtr.refresh"]
        call = next(sp for sp in finished if sp.name == "sfrtr.provider_call")
        parent = next(sp for sp in finished if sp.name == "sfrtr.refresh" and
                      sp.context.span_id == call.parent.span_id)
        assert parent is not None
        for span in finished:
            assert ("sfrtr.customer" in span.attributes) is customer_attribute
            assert all(stale not in str(v) for v in span.attributes.values())
        counts = histograms(reader)
        assert counts[("sfrtr.provider_call.duration", (("outcome", "ok"),))] == 1
        # Every caller that waited: the fifty after the 401, the one without a token.
        assert counts[("sfrtr.caller_wait.duration", ())] == 51
        assert emulator.ledger["redemptions"] == 1
    finally:
        await manager.aclose()
        meters.shutdown()
        tracers.shutdown()
