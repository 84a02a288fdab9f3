"""The README's main job: the demo shows no reuse with sfrtr, and reuse without it."""

from __future__ import annotations

import pytest

from sfrtr.cli import build_parser
from sfrtr.demo import DemoConfig, run_demo

pytestmark = pytest.mark.anyio


async def test_demo_with_sfrtr_has_no_reuse_and_no_failures():
    lines: list[str] = []
    figures = await run_demo(DemoConfig(customers=5, concurrency=40, duration=2.5,
                                        expire_every=1.0), out=lines.append)
    assert figures["session expiries"] == 2
    assert figures["redemptions"] == 5 * 2
    assert figures["reuse"] == 0
    assert figures["revocations"] == 0
    assert figures["failed calls"] == 0
    assert figures["calls"] > 100
    assert any("redemptions" in line for line in lines)


async def test_naive_demo_shows_reuse_and_revocations():
    figures = await run_demo(DemoConfig(customers=10, concurrency=200, duration=2.5,
                                        expire_every=1.0, naive=True), out=lambda _: None)
    assert figures["reuse"] > 0
    assert figures["revocations"] > 0
    assert figures["failed calls"] > 0


def test_cli_rejects_nonsense():
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--customers", "0"])
    args = parser.parse_args(["demo", "--naive", "--duration", "3"])
    assert args.naive
    assert args.duration == 3.0


async def test_demo_across_processes_on_a_local_etcd():
    from sfrtr.demo_processes import run_processes

    lines: list[str] = []
    figures = await run_processes(DemoConfig(customers=5, concurrency=20, duration=3.5,
                                             expire_every=1.0), 2, None, out=lines.append)
    assert any("started a local etcd" in line for line in lines)
    assert figures["session expiries"] == 3
    assert figures["redemptions"] == 5 * 3
    assert figures["reuse"] == 0
    assert figures["revocations"] == 0
    assert figures["failed calls"] == 0
