"""The ``sfrtr`` command as a newcomer meets it: every bad input is one line and exit
status 2 (a traceback only with -v), help for every command, --version, Ctrl-C, the
emulator on its own, a missing extra named with its pip command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import sfrtr
from sfrtr.cli import build_parser, main
from sfrtr.cli.admin import status_rows
from sfrtr.oauth import OAuthClient, OAuthConfig, OutcomeKind
from sfrtr.oauth.instance_url import InstanceUrlPolicy
from sfrtr.secret import Secret


def run(argv: list[str]) -> int:
    """``main(argv)`` in-process, with argparse's exits turned into a status."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def sfrtr_process(*args: str, env: dict[str, str] | None = None,
                  **kwargs: object) -> subprocess.Popen[str]:
    # Restore SIGINT's default: a shell's background job would start with it ignored.
    return subprocess.Popen(  # type: ignore[call-overload,no-any-return]
        [sys.executable, "-m", "sfrtr", *args], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kwargs)


COMMANDS = ("demo", "emulator", "status", "clear", "keeper", "rekey", "migrate")

BAD_INPUTS = [
    (["demo", "--customers", "abc"], "'abc' is not a whole number"),
    (["demo", "--customers", "0"], "0 must be at least 1"),
    (["demo", "--concurrency", "-3"], "-3 must be at least 1"),
    (["demo", "--duration", "nan"], "nan must be a finite number of seconds above 0"),
    (["demo", "--duration", "inf"], "inf must be a finite number of seconds above 0"),
    (["demo", "--duration", "soon"], "'soon' is not a number of seconds"),
    (["demo", "--expire-every", "0"], "0 must be a finite number of seconds above 0"),
    (["demo", "--processes", "2", "--etcd", "notaport"], "'notaport' is not HOST:PORT"),
    (["demo", "--etcd", "127.0.0.1:99999"], "is not HOST:PORT"),
    (["demo", "--store", "redis"], "invalid choice: 'redis'"),
    (["demo", "--processes", "2", "--store", "memory"], "cannot be shared"),
    (["demo", "--naive", "--processes", "2"], "--naive uses no store"),
    (["demo", "--store", "postgres"], "--store postgres needs --postgres DSN"),
    (["demo", "--duration", "2", "--expire-every", "2"], "no session would expire"),
    (["emulator", "--port", "99999"], "99999 is not a port: use 1-65535"),
    (["emulator", "--port", "http"], "'http' is not a port number"),
    (["emulator", "--host", "0.0.0.0"], "0.0.0.0 is not a loopback address"),
    (["emulator", "--customers", "-1"], "-1 must be 0 or more"),
    (["status", "--namespace", "foo/"], "'foo/' is not a namespace"),
    (["status", "--namespace", ""], "'' is not a namespace"),
    (["status", "--etcd", "localhost"], "'localhost' is not HOST:PORT"),
    (["status", "--sqlite", "a.db", "--postgres", "x"], "give one store: --sqlite or --postgres"),
    (["status", ""], "the customer name is empty"),
    (["keeper", "--max-idle-days", "-1"], "-1 must be a finite number of days, 0 or more"),
    (["keeper", "--max-idle-days", "nan"], "nan must be a finite number of days"),
    (["keeper", "--rate", "0"], "0 must be a finite number per second above 0"),
    (["keeper", "--period", "soon"], "'soon' is not a number of seconds"),
    (["keeper", "--json"], "--json is for --once"),
    (["keeper", "--once", "--client-id", "", "--sqlite", "/nonexistent.db"],
     "no client id: give --client-id or set $SFRTR_CLIENT_ID"),
    (["keeper", "--once", "--client-id", "app", "--login-url", "http://login.example.com"],
     "is not https (plain http is for the emulator on a loopback address only)"),
    (["keeper", "--once", "--client-id", "app", "--sqlite", "/nonexistent.db"],
     "no SQLite store at /nonexistent.db"),
    (["rekey", "--sqlite", "/nonexistent.db"], "no SQLite store at /nonexistent.db"),
    (["clear", ""], "the customer name is empty"),
    (["clear", " acme"], "' acme' has leading or trailing blanks"),
    (["migrate"], "the following arguments are required: --postgres"),
    (["migrate", "--postgres", "x", "--schema", "bad name", "--print-sql"], "bad name"),
    (["launch"], "invalid choice: 'launch'"),
    ([], "the following arguments are required: COMMAND"),
]


@pytest.mark.parametrize(("argv", "says"), BAD_INPUTS, ids=[" ".join(a) or "(none)"
                                                           for a, _ in BAD_INPUTS])
def test_a_bad_input_is_one_line_and_exit_status_2(capsys, argv, says):
    assert run(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1, err
    command = argv[0] if argv and argv[0] in COMMANDS else ""
    assert err.startswith(f"sfrtr {command}: error: ".replace(" :", ":"))
    assert says in err
    assert "Traceback" not in err


def test_verbose_is_accepted_before_and_after_the_command():
    parser = build_parser()
    assert parser.parse_args(["-v", "status"]).verbose is True
    assert parser.parse_args(["status", "-v"]).verbose is True
    assert parser.parse_args(["demo", "--naive", "--verbose"]).verbose is True
    assert getattr(parser.parse_args(["status"]), "verbose", False) is False


def test_version(capsys):
    assert run(["--version"]) == 0
    assert capsys.readouterr().out == f"sfrtr {sfrtr.__version__}\n"


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_command_says_its_defaults_without_markup(capsys, command):
    assert run([command, "--help"]) == 0
    text = capsys.readouterr().out
    assert "``" not in text
    assert ":class:" not in text
    assert text.startswith(f"usage: sfrtr {command} ")
    assert "-v, --verbose" in text
    text = " ".join(text.split())  # argparse wraps lines anywhere
    defaults = {"demo": ["(default: 20)", "(default: 200)", "(default: 10.0)", "(default: 2.0)"],
                "emulator": ["(default: 127.0.0.1)", "(default: 8765)", "(default: 0)"],
                "status": ["(default: sfrtr)", "SFRTR_ETCD_PASSWORD", "127.0.0.1:2379"],
                "clear": ["(default: sfrtr)", "--force", "--sqlite PATH"],
                "keeper": ["(default: 7.0)", "(default: 3600.0)", "(default: 1.0)",
                           "SFRTR_CLIENT_SECRET", "(default: https://login.salesforce.com)"],
                "rekey": ["SFRTR_KEYS", "--postgres DSN", "(default: public)"],
                "migrate": ["(default: public)", "(default: sfrtr)"]}[command]
    for default in defaults:
        assert default in text, default


def test_top_level_help_lists_every_command_and_the_exit_statuses(capsys):
    assert run(["--help"]) == 0
    text = capsys.readouterr().out
    for command in COMMANDS:
        assert f"    {command} " in text
    assert "exit status: 0" in text
    assert "130 interrupted" in text
    assert "``" not in text


def test_unreachable_etcd_names_the_endpoint_in_one_line_and_v_adds_the_traceback():
    process = sfrtr_process("status", "--etcd", "127.0.0.1:1", "--namespace", "ops/x")
    out, err = process.communicate(timeout=60)
    assert process.returncode == 2
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("sfrtr status: error: etcd at 127.0.0.1:1 (namespace ops/x): ")
    assert "UNAVAILABLE" in err
    assert "Traceback" not in err
    process = sfrtr_process("status", "-v", env={"SFRTR_ETCD_ENDPOINTS": "127.0.0.1:1"})
    _, err = process.communicate(timeout=60)
    assert process.returncode == 2
    assert "Traceback" in err
    assert err.splitlines()[-1].startswith("sfrtr status: error: etcd at 127.0.0.1:1 ")


def test_a_username_without_a_password_is_one_line(capsys):
    assert run(["status", "--etcd", "127.0.0.1:1", "--username", "ops"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "username and password go together" in err
    assert "SFRTR_ETCD_PASSWORD" in err


def test_demo_on_an_unreachable_etcd_names_it(capsys):
    code = run(["demo", "--processes", "2", "--etcd", "127.0.0.1:1", "--duration", "1",
                "--expire-every", "0.4"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("sfrtr demo: error: etcd at 127.0.0.1:1: ")
    assert "is etcd running there?" in err


def test_a_missing_etcd_extra_is_named_with_its_pip_command(capsys, monkeypatch):
    for module in ("grpc", "aetcd"):
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    for module in ("sfrtr.store.etcd", "sfrtr.store.etcd_client"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    for argv in (["demo", "--processes", "4", "--store", "etcd"],
                 ["status", "--etcd", "127.0.0.1:2379"], ["clear", "acme"]):
        assert run(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert "needs the etcd extra, which is not installed: pip install 'sfrtr[etcd]'" in err
    with pytest.raises(sfrtr.MissingExtra) as caught:
        _ = sfrtr.EtcdStore
    assert isinstance(caught.value, ImportError)
    assert "pip install 'sfrtr[etcd]'" in str(caught.value)
    assert caught.value.missing in ("grpc", "aetcd")


def _interrupt_after_first_progress(*args: str) -> tuple[int | None, str]:
    process = sfrtr_process(*args, start_new_session=True)
    assert process.stdout is not None
    for line in process.stdout:
        if "calls" in line and "refreshes" in line:
            break
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=60)
    return process.returncode, err


@pytest.mark.parametrize("extra", [[], ["--processes", "2"]], ids=["one process", "processes"])
def test_ctrl_c_ends_the_demo_with_one_line(extra):
    code, err = _interrupt_after_first_progress("demo", "--duration", "20", "--customers", "3",
                                                "--concurrency", "20", *extra)
    assert code == 130
    assert err == "sfrtr demo: interrupted\n"


def test_the_emulator_prints_how_to_connect_and_its_grants_and_refuses_a_busy_port():
    first = sfrtr_process("emulator", "--port", "0", "--customers", "2",
                          start_new_session=True)
    assert first.stdout is not None
    lines = []
    for line in first.stdout:
        lines.append(line.rstrip("\n"))
        if line.startswith("Ctrl-C stops it"):
            break
    try:
        url = lines[0].removeprefix("sfrtr emulator on ")
        fields = {line.split()[0] + " " + line.split()[1]: line.split()[-1] for line in lines
                  if line.startswith(("  login URL", "  client id", "  client secret"))}
        assert fields["login URL"] == url
        assert "not real credentials" in "\n".join(lines)
        tokens = [line.split()[-1] for line in lines if "refresh_token" in line]
        assert len(tokens) == 2
        port = url.rsplit(":", 1)[1]
        second = sfrtr_process("emulator", "--port", port)
        _out, err = second.communicate(timeout=60)
        assert second.returncode == 2
        assert err == (f"sfrtr emulator: error: port {port} on 127.0.0.1 is in use: stop what "
                       "listens there, or pick another with --port (0: any free port)\n")

        async def refresh() -> OutcomeKind:
            oauth = OAuthClient(OAuthConfig(
                client_id=fields["client id"], client_secret=Secret(fields["client secret"]),
                login_url=url, instance_policy=InstanceUrlPolicy.for_emulator()))
            try:
                return (await oauth.refresh(Secret(tokens[1]))).kind
            finally:
                await oauth.aclose()

        import asyncio

        assert asyncio.run(refresh()) is OutcomeKind.OK  # the printed grant works
    finally:
        os.killpg(first.pid, signal.SIGINT)
        _, err = first.communicate(timeout=30)
    assert first.returncode == 0
    assert "Traceback" not in err


@pytest.mark.anyio
async def test_status_reads_without_a_lease(etcd_server, etcd_store, namespace):
    from sfrtr import Status, TokenRecord
    from sfrtr.store.etcd_client import EtcdClient, EtcdSettings

    record = TokenRecord(access_token=Secret("at-x"), refresh_token=Secret("rt-x"),
                         instance_url="https://x.my.salesforce.com", issued_at=1.0,
                         expires_at=time.time() + 3600, generation=2)
    await etcd_store.put("acme", record)
    # A record sealed at rest: its clear fields show without the key.
    from sfrtr.store.etcd import EtcdStore
    from sfrtr.store.sealing import KeyRing, Sealer

    async with EtcdStore(EtcdSettings(endpoints=[etcd_server.endpoint]), namespace=namespace,
                         sealer=Sealer(KeyRing([("k1", b"k" * 32)]))) as sealed_store:
        await sealed_store.put("globex/eu", record)
    client = EtcdClient(EtcdSettings(endpoints=[etcd_server.endpoint]))
    try:
        rows = await status_rows(client, namespace)
        # One Range page and nothing else: no LeaseGrant, no Txn, no watch.
        assert client.round_trips == 1
    finally:
        await client.close()
    assert [(r.customer, r.status, r.generation, r.locked) for r in rows] == [
        ("acme", Status.VALID, 2, False), ("globex/eu", Status.VALID, 2, False)]
    assert rows[0].refresh_fingerprint == record.refresh_token.fingerprint
    assert rows[1].refresh_fingerprint == "sealed"


def test_an_unreachable_postgres_is_one_line_without_its_password(capsys):
    assert run(["migrate", "--postgres", "postgresql://app:hunter2@127.0.0.1:1/db"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("sfrtr migrate: error: Postgres at postgresql://app")
    assert "127.0.0.1:1" in err
    assert "hunter2" not in err


@pytest.mark.anyio
async def test_clear_opens_sealed_records_with_the_workers_key_ring(etcd_server, namespace,
                                                                   capsys, monkeypatch):
    import asyncio
    import base64

    from sfrtr.protocol import dead_record
    from sfrtr.store.etcd import EtcdStore
    from sfrtr.store.etcd_client import EtcdSettings
    from sfrtr.store.sealing import KeyRing, Sealer

    key = b"k" * 32
    record = dead_record(a_record(), "refresh token rejected")
    async with EtcdStore(EtcdSettings(endpoints=[etcd_server.endpoint]), namespace=namespace,
                         sealer=Sealer(KeyRing([("k1", key)]))) as store:
        await store.put("acme", record)
        argv = ["clear", "acme", "--etcd", etcd_server.endpoint, "--namespace", namespace]
        monkeypatch.delenv("SFRTR_KEYS", raising=False)
        assert await asyncio.to_thread(run, argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert "is sealed (key 'k1')" in err
        assert "$SFRTR_KEYS" in err
        assert await store.read("acme") is not None  # nothing was cleared
        monkeypatch.setenv("SFRTR_KEYS", "k1:" + base64.b64encode(key).decode())
        assert await asyncio.to_thread(run, argv) == 0
        assert capsys.readouterr().out == "acme: cleared (reauth_required)\n"
        assert await store.customers() == []  # a direct read (the mirror follows later)


def a_record():
    from sfrtr import TokenRecord

    return TokenRecord(access_token=Secret("at-x"), refresh_token=Secret("rt-x"),
                       instance_url="https://x.my.salesforce.com", issued_at=1.0,
                       expires_at=time.time() + 3600, generation=2)
