"""The README's main job: the demo shows no reuse with sfrtr, and reuse without it."""

from __future__ import annotations

import pytest

from sfrtr.cli import build_parser, main
from sfrtr.cli.demo import DemoConfig, run_demo

pytestmark = pytest.mark.anyio


async def test_demo_with_sfrtr_has_no_reuse_and_no_failures():
    lines: list[str] = []
    figures = await run_demo(DemoConfig(customers=5, concurrency=40, duration=2.5,
                                        expire_every=1.0), out=lines.append)
    assert figures["session expiries"] == 2
    # Exactly one redemption per customer per expiry: the coroutines pick customers at
    # random (no convoy) and no expiry falls in the run's last half second.
    assert figures["redemptions"] == figures["expected redemptions"] == 5 * 2
    assert figures["reuse"] == 0
    assert figures["revocations"] == 0
    assert figures["customers locked out"] == 0
    assert figures["failed calls"] == 0
    assert figures["calls"] > 100
    assert lines[0].startswith("sfrtr demo: 40 coroutines query the Salesforce REST API for "
                               "5 customers")
    assert "store: the memory store, one process (--processes P: P processes on SQLite)" in lines
    assert "expected: 5 customers x 2 expiries = 10 redemptions, no reuse, no customer " \
           "locked out" in lines
    assert any("Every 1 s (2 times)" in line for line in lines)
    progress = [line for line in lines if "calls" in line and "refreshes" in line]
    assert len(progress) >= 2  # one per second, from the first second on
    assert any(line.startswith("legend:") for line in lines)
    assert any(line.lstrip().startswith("reuse ") and "theft" in line for line in lines)
    assert lines[-1] == ("verdict: 0 of 5 customers locked out, no refresh token reused, "
                         "10 redemptions as expected: the invariants held")


def test_expiries_leave_the_last_half_second_alone():
    assert DemoConfig(duration=10, expire_every=2).expiry_times() == [2, 4, 6, 8]
    assert DemoConfig(duration=10.3, expire_every=2).expiry_times() == [2, 4, 6, 8]
    assert DemoConfig(duration=10.5, expire_every=2).expiry_times() == [2, 4, 6, 8, 10]
    assert DemoConfig(duration=0.5, expire_every=0.2).expiry_times() == [0.2]
    assert len(DemoConfig(duration=3, expire_every=0.4).expiry_times()) == 6


async def test_naive_demo_shows_reuse_and_revocations():
    lines: list[str] = []
    figures = await run_demo(DemoConfig(customers=10, concurrency=200, duration=2.5,
                                        expire_every=1.0, naive=True), out=lines.append)
    assert figures["reuse"] > 0
    assert figures["revocations"] > 0
    assert figures["failed calls"] > 0
    locked = int(figures["customers locked out"])
    assert locked > 0
    assert lines[-1].startswith(f"verdict: {locked} of 10 customers locked out, ")
    assert lines[-1].endswith("this is what sfrtr prevents (run without --naive to compare)")


def test_cli_rejects_nonsense():
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--customers", "0"])
    args = parser.parse_args(["demo", "--naive", "--duration", "3"])
    assert args.naive
    assert args.duration == 3.0


async def test_demo_across_processes_on_a_local_etcd():
    from sfrtr.cli.demo_processes import run_processes

    lines: list[str] = []
    figures = await run_processes(DemoConfig(customers=5, concurrency=20, duration=3.5,
                                             expire_every=1.0), 2, None, store="etcd",
                                  out=lines.append)
    assert any("started a local etcd" in line for line in lines)
    store = next(line for line in lines if line.startswith("store: the etcd store ("))
    namespace = store.split("namespace ")[1].split(")")[0]
    assert namespace.startswith("sfrtr-demo/")
    assert any(line.strip().startswith("to look at the grants while it runs: sfrtr status "
                                       "--etcd ") and line.endswith(f"--namespace {namespace}")
               for line in lines)
    assert figures["session expiries"] == 3
    assert figures["redemptions"] == 5 * 3
    assert lines[-1].startswith("verdict: 0 of 5 customers locked out")
    assert any(line.startswith("  max loop stall per worker ms: ") for line in lines)
    assert sum("calls" in line and "refreshes" in line for line in lines) >= 3
    assert figures["reuse"] == 0
    assert figures["revocations"] == 0
    assert figures["failed calls"] == 0


async def test_demo_across_processes_on_sqlite_needs_no_server():
    from sfrtr.cli.demo_processes import run_processes

    lines: list[str] = []
    figures = await run_processes(DemoConfig(customers=5, concurrency=20, duration=2.5,
                                             expire_every=1.0), 2, out=lines.append)
    assert any(line.startswith("store: the SQLite store (") for line in lines)
    assert any("2 processes on the sqlite store" in line for line in lines)
    assert figures["session expiries"] >= 1
    assert figures["redemptions"] == 5 * figures["session expiries"]
    assert figures["reuse"] == 0
    assert figures["revocations"] == 0
    assert figures["failed calls"] == 0


def test_cli_demo_defaults_to_sqlite_across_processes(monkeypatch):
    import sfrtr.cli.demo_processes

    chosen: dict[str, object] = {}

    async def fake(config, processes, etcd=None, *, store, postgres=None, out=print):
        chosen.update(processes=processes, store=store, etcd=etcd, postgres=postgres)
        return {"reuse": 0, "revocations": 0}

    monkeypatch.setattr(sfrtr.cli.demo_processes, "run_processes", fake)
    assert main(["demo", "--processes", "3"]) == 0
    assert chosen == {"processes": 3, "store": "sqlite", "etcd": None, "postgres": None}
    assert main(["demo", "--processes", "2", "--etcd", "h:1"]) == 0
    assert chosen["store"] == "etcd"
    assert main(["demo", "--processes", "2", "--store", "etcd"]) == 0
    assert chosen["store"] == "etcd"
    assert chosen["etcd"] is None  # a local etcd, started by the demo
    assert main(["demo", "--postgres", "postgresql://h/db"]) == 0
    assert chosen == {"processes": 1, "store": "postgres", "etcd": None,
                      "postgres": "postgresql://h/db"}


@pytest.mark.parametrize(("argv", "names"), [
    (["--processes", "2", "--store", "memory"], ("--store sqlite", "--store etcd")),
    (["--processes", "2", "--store", "postgres"], ("--postgres DSN",)),
    (["--store", "postgres"], ("--postgres DSN",)),
    (["--store", "sqlite", "--etcd", "h:1"], ("--store etcd",)),
    (["--naive", "--processes", "2"], ("--naive",)),
])
def test_cli_demo_refuses_what_cannot_work_in_one_line(capsys, argv, names):
    assert main(["demo", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("sfrtr demo: error: ")
    assert all(name in err for name in names)
    assert "Traceback" not in err
