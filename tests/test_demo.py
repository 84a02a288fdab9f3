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
    assert figures["redemptions"] == 5 * 2
    assert figures["reuse"] == 0
    assert figures["revocations"] == 0
    assert figures["failed calls"] == 0
    assert figures["calls"] > 100
    assert any("redemptions" in line for line in lines)
    assert lines[0].startswith("store: the memory store")


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
    from sfrtr.cli.demo_processes import run_processes

    lines: list[str] = []
    figures = await run_processes(DemoConfig(customers=5, concurrency=20, duration=3.5,
                                             expire_every=1.0), 2, None, store="etcd",
                                  out=lines.append)
    assert any("started a local etcd" in line for line in lines)
    assert any(line.startswith("store: the etcd store") for line in lines)
    assert figures["session expiries"] == 3
    assert figures["redemptions"] == 5 * 3
    assert figures["reuse"] == 0
    assert figures["revocations"] == 0
    assert figures["failed calls"] == 0


async def test_demo_across_processes_on_sqlite_needs_no_server():
    from sfrtr.cli.demo_processes import run_processes

    lines: list[str] = []
    figures = await run_processes(DemoConfig(customers=5, concurrency=20, duration=2.5,
                                             expire_every=1.0), 2, out=lines.append)
    assert lines[0].startswith("store: the SQLite store (")
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
