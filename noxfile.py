"""Sessions: tests, lint, typecheck, bench. ``nox -s tests`` is what CI runs."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """The whole suite, against the emulator and the real servers it starts itself
    (etcd, PostgreSQL; Debian's packages are installed first where absent)."""
    session.run("bash", ".ci/install-servers", external=True)
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.5")
    session.run("ruff", "check", "sfrtr", "tests", "benchmarks", "examples", "tools",
                "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[etcd]", "mypy>=1.10")
    session.run("mypy", "sfrtr")


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation site from docs/ and the docstrings (mkdocs.yml), into site/;
    every warning is an error (a broken link, a missing page, a bad reference)."""
    session.install("-e", ".[docs]")
    session.run("mkdocs", "build", "--strict", *session.posargs,
                env={"NO_MKDOCS_2_WARNING": "1"})


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmark suite: prints tables, writes JSON and PNGs under benchmarks/results/
    (``docs/benchmarks.md`` explains each one)."""
    session.install("-e", ".[test,bench]")
    session.run("python", "-m", "benchmarks", *session.posargs)
    # The stores side by side, with the Nango-style Redis lock beside them.
    session.run("bash", ".ci/install-bench-servers", external=True)
    session.run("python", "-m", "benchmarks.stores", *session.posargs)


@nox.session
def mutants(session: nox.Session) -> None:
    """Mutation testing of the coordination core with its fast tests (2 jobs, ~18 min):
    a table and ``benchmarks/results/mutants.json``; ``docs/testing.md`` explains it.
    ``-- --module sfrtr/protocol.py``: one module; ``-- --show ID``: one mutant's diff."""
    session.install("-e", ".[test]")
    session.run("python", "tools/mutants.py", *session.posargs)


@nox.session
def faults(session: nox.Session) -> None:
    """Fault runs: 8 workers on etcd against the emulator (``-- --quick``: one seed, < 5 min)."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "benchmarks.faults", *session.posargs)


@nox.session
def proof(session: nox.Session) -> None:
    """The multi-process proof at the issue's size on every shared store: 8 processes x
    200 coroutines x 50 customers x 5 session expiries (CI runs SQLite and Postgres at
    6 x 100 x 30; etcd at this size)."""
    session.run("bash", ".ci/install-servers", external=True)
    session.install("-e", ".[test]")
    session.run("pytest", "-s", "-p", "no:cacheprovider",
                "tests/test_multiprocess.py::test_eight_processes_two_hundred_coroutines_fifty_customers",
                "tests/test_sqlite_store.py::test_processes_coroutines_customers_and_session_expiries",
                "tests/test_postgres_store.py::test_processes_coroutines_customers_and_session_expiries",
                *session.posargs, env={"SFRTR_PROOF_SIZE": "issue"})


@nox.session
def sim(session: nox.Session) -> None:
    """Long deterministic-simulation runs (``-- --runs 200000 --jobs 2 --seed N``)."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "tests.sim", *(session.posargs or ["--runs", "20000"]))


@nox.session
def scale(session: nox.Session) -> None:
    """The etcd scale tests at 100,000 customers, then the scale and watcher benchmarks."""
    session.install("-e", ".[test]")
    session.run("pytest", "tests/test_etcd_scale.py", "-s",
                env={"SFRTR_SCALE_CUSTOMERS": "100000"})
    session.run("python", "-m", "benchmarks.scale", *session.posargs)
    session.run("python", "-m", "benchmarks.watchers")


@nox.session
def cluster(session: nox.Session) -> None:
    """Every three-member etcd cluster scenario (leader kill, paused follower, the
    connected member killed, quorum lost), on a production-recommended etcd."""
    session.install("-e", ".[test]")
    session.run("pytest", "tests/test_etcd_cluster.py", "tests/test_etcd_versions.py", "-s",
                *session.posargs, env={"SFRTR_CLUSTER_MATRIX": "1"})
