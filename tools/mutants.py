"""Mutation testing of the coordination core: ``nox -s mutants`` (or run this file).

A small AST mutator, written for this tree rather than borrowed: each mutant is one
change to one module (a condition negated, a comparison's operator swapped, an
``and``/``or`` operand dropped, a constant replaced, a statement deleted, an
``if``/``else`` swapped, an argument dropped...), and the module's own fast tests
(``TARGETS``) run against it in a scratch copy of the tree. A mutant is *killed*
when a test fails (or the run times out), and *survives* when every test passes:
some behaviour of the module that no test pins.

Before the mutants, each module's tests run once on the unmutated module under a
line tracer: that run must pass, and each mutant is marked ``covered`` or not (a
line no test executes in-process; a survivor there wants a test, not a reason).

What is not mutated: docstrings, imports, annotations, decorators, type variables,
the text of exceptions raised (tests match on types and fields, not wording),
f-strings, and a function's closing ``return None`` (deleting it changes nothing).
Survivors are listed with their line and change; the ones that are equivalent
(no caller could tell) are explained in ``docs/testing.md``.

Usage::

    python tools/mutants.py [--jobs 2] [--module sfrtr/protocol.py ...]
                            [--out benchmarks/results/mutants.json]
    python tools/mutants.py --list sfrtr/singleflight.py   # the mutants, no runs
    python tools/mutants.py --show sfrtr/protocol.py:42    # one mutant as a diff
    python tools/mutants.py --rerun benchmarks/results/mutants.json  # survivors only
"""

from __future__ import annotations

import argparse
import ast
import copy
import difflib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Target:
    module: str
    tests: tuple[str, ...]
    """Fastest first: ``-x`` stops at the first failure, so most mutants die early."""
    keyword: str = ""
    """A ``-k`` expression (the contract suite runs on the memory store only)."""


#: Every contract test on the memory store, every other test of the listed files.
MEMORY_ONLY = "memory or not test_store_contract"

TARGETS: tuple[Target, ...] = (
    Target("sfrtr/protocol.py", (
        "tests/test_protocol.py", "tests/test_review_regressions.py",
        "tests/test_manager_hot_path.py", "tests/test_manager_outcomes.py",
        "tests/test_token_answers.py")),
    Target("sfrtr/singleflight.py", (
        "tests/test_singleflight.py", "tests/test_manager_hot_path.py",
        "tests/test_manager_storms.py")),
    Target("sfrtr/records.py", (
        "tests/test_records.py", "tests/test_protocol.py", "tests/test_store_contract.py",
        "tests/test_memory_store.py", "tests/test_manager_hot_path.py"), MEMORY_ONLY),
    Target("sfrtr/oauth/outcome.py", (
        "tests/test_outcomes.py", "tests/test_oauth_client.py",
        "tests/test_manager_outcomes.py", "tests/test_token_answers.py")),
    Target("sfrtr/store/memory.py", (
        "tests/test_memory_store.py", "tests/test_store_contract.py",
        "tests/test_manager_hot_path.py", "tests/test_review_regressions.py",
        "tests/test_manager_storms.py"), MEMORY_ONLY),
)

PYTEST = ("-x", "-q", "-p", "no:cacheprovider", "--timeout=30", "-o", "addopts=")


# --------------------------------------------------------------------------- mutants

@dataclass
class Mutant:
    id: str
    line: int
    """Line in the module as committed."""
    kind: str
    description: str
    source: str = field(repr=False)
    covered: bool = True
    status: str = ""
    """killed | timeout | survived | error"""
    seconds: float = 0.0
    span: tuple[int, int] = (0, 0)
    """Lines of the mutated node in the canonical (unparsed) module the tracer sees."""


Apply = Callable[[ast.AST, dict[ast.AST, tuple[ast.AST, str, int | None]]], None]

COMPARE_SWAP: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
    ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Lt: ast.LtE, ast.LtE: ast.Lt,
    ast.Gt: ast.GtE, ast.GtE: ast.Gt,
}
BINOP_SWAP: dict[type[ast.operator], type[ast.operator]] = {
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
    ast.FloorDiv: ast.Div, ast.Mod: ast.Mult,
}
BODY_FIELDS = ("body", "orelse", "finalbody")
NOT_DELETED = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef,
               ast.ClassDef, ast.Pass, ast.Global, ast.Nonlocal)


def _parents(tree: ast.AST) -> dict[ast.AST, tuple[ast.AST, str, int | None]]:
    out: dict[ast.AST, tuple[ast.AST, str, int | None]] = {}
    for node in ast.walk(tree):
        for name, value in ast.iter_fields(node):
            if isinstance(value, list):
                for i, child in enumerate(value):
                    if isinstance(child, ast.AST):
                        out[child] = (node, name, i)
            elif isinstance(value, ast.AST):
                out[value] = (node, name, None)
    return out


def _excluded(tree: ast.AST, parents: dict[ast.AST, tuple[ast.AST, str, int | None]]
              ) -> set[ast.AST]:
    """Nodes never mutated: docstrings, annotations, decorators, imports, raise texts."""
    skip: set[ast.AST] = set()

    def drop(node: ast.AST | None) -> None:
        if node is not None:
            skip.update(ast.walk(node))

    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                drop(body[0])
        if isinstance(node, ast.Module | ast.ClassDef):
            # An attribute docstring (a string statement after a field) says nothing.
            for stmt in node.body:
                if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
                    drop(stmt)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            for deco in node.decorator_list:
                drop(deco)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            drop(node.returns)
        if isinstance(node, ast.arg):
            drop(node.annotation)
        if isinstance(node, ast.AnnAssign):
            drop(node.annotation)
        if isinstance(node, ast.Import | ast.ImportFrom | ast.JoinedStr):
            drop(node)
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) \
                and isinstance(node.value.func, ast.Name) and node.value.func.id == "TypeVar":
            drop(node)
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            for arg in node.exc.args:
                if isinstance(arg, ast.Constant | ast.JoinedStr):
                    drop(arg)
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
            # Generic[K, T], dict[str, int] at runtime (class bases, TypeVar bounds).
            parent = parents.get(node)
            if parent is not None and parent[1] in ("bases", "bound"):
                drop(node)
    return skip


def _variants(node: ast.AST, parents: dict[ast.AST, tuple[ast.AST, str, int | None]]
              ) -> Iterator[tuple[str, str, Apply]]:
    """(kind, description, apply) for each mutation of ``node``; ``apply`` edits a copy
    of the node in a fresh tree, given that tree's parent map."""
    if isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            swap = COMPARE_SWAP.get(type(op))
            if swap is not None:
                def apply(n: Any, _p: Any, i: int = i, swap: type[ast.cmpop] = swap) -> None:
                    n.ops[i] = swap()
                yield "compare", f"{_op(op)} -> {_op(swap())}", apply
    if isinstance(node, ast.BoolOp):
        name = "and" if isinstance(node.op, ast.And) else "or"
        other = "or" if name == "and" else "and"

        def flip(n: Any, _p: Any) -> None:
            n.op = ast.Or() if isinstance(n.op, ast.And) else ast.And()
        yield "boolop", f"{name} -> {other}", flip
        for i, operand in enumerate(node.values):
            def drop(n: Any, p: Any, i: int = i) -> None:
                rest = [v for j, v in enumerate(n.values) if j != i]
                if len(rest) == 1:
                    _replace(n, rest[0], p)
                else:
                    n.values = rest
            yield "boolop", f"drop `{name}` operand `{_short(operand)}`", drop
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        def unnot(n: Any, p: Any) -> None:
            _replace(n, n.operand, p)
        yield "negate", f"`not {_short(node.operand)}` -> `{_short(node.operand)}`", unnot
    if isinstance(node, ast.If | ast.While | ast.IfExp | ast.Assert):
        test = node.test
        if not (isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not)):
            def negate(n: Any, _p: Any) -> None:
                n.test = ast.UnaryOp(op=ast.Not(), operand=n.test)
            yield "negate", f"condition `{_short(test)}` negated", negate
    if (isinstance(node, ast.If) and node.orelse) or isinstance(node, ast.IfExp):
        def swap_branches(n: Any, _p: Any) -> None:
            n.body, n.orelse = n.orelse, n.body
        yield "branch", "if/else branches swapped", swap_branches
    if isinstance(node, ast.BinOp | ast.AugAssign):
        swap_op = BINOP_SWAP.get(type(node.op))
        if swap_op is not None:
            def binop(n: Any, _p: Any, swap_op: type[ast.operator] = swap_op) -> None:
                n.op = swap_op()
            yield "arith", f"{_op(node.op)} -> {_op(swap_op())}", binop
    if isinstance(node, ast.Constant) and not isinstance(node.value, bytes):
        value = node.value
        new: Any
        if isinstance(value, bool):
            new = not value
        elif isinstance(value, int | float):
            new = value + 1
        elif isinstance(value, str):
            new = "" if value else "mutant"
        else:
            new = None
        if new is not None:
            def const(n: Any, _p: Any, new: Any = new) -> None:
                n.value = new
            yield "constant", f"{value!r} -> {new!r}", const
    if isinstance(node, ast.Call):
        for i, arg in enumerate(node.args):
            if isinstance(arg, ast.Starred) or (isinstance(arg, ast.Constant)
                                                and arg.value is None):
                continue

            def none_arg(n: Any, _p: Any, i: int = i) -> None:
                n.args[i] = ast.Constant(value=None)
            yield "argument", f"argument `{_short(arg)}` -> None", none_arg
        for i, kw in enumerate(node.keywords):
            if kw.arg is None:
                continue

            def drop_kw(n: Any, _p: Any, i: int = i) -> None:
                del n.keywords[i]
            yield "argument", f"keyword `{kw.arg}=` dropped", drop_kw
    if isinstance(node, ast.Dict):
        for i, key in enumerate(node.keys):
            if key is None:
                continue

            def drop_item(n: Any, _p: Any, i: int = i) -> None:
                del n.keys[i]
                del n.values[i]
            yield "collection", f"dict entry `{_short(key)}` dropped", drop_item
    if isinstance(node, ast.Tuple) and isinstance(node.ctx, ast.Load) and len(node.elts) > 1:
        for i, elt in enumerate(node.elts):
            def drop_elt(n: Any, _p: Any, i: int = i) -> None:
                del n.elts[i]
            yield "collection", f"tuple element `{_short(elt)}` dropped", drop_elt
    if isinstance(node, ast.stmt) and not isinstance(node, NOT_DELETED):
        parent = parents.get(node)
        if parent is not None and parent[1] in BODY_FIELDS and not _falls_off(node, parent):
            def delete(n: Any, p: Any) -> None:
                owner, name, index = p[n]
                getattr(owner, name)[index] = ast.Pass()
            yield "delete", f"statement `{_short(node)}` deleted", delete


def _falls_off(node: ast.stmt, parent: tuple[ast.AST, str, int | None]) -> bool:
    """A function's last statement ``return None``: deleting it changes nothing."""
    owner, name, index = parent
    return (isinstance(owner, ast.FunctionDef | ast.AsyncFunctionDef) and name == "body"
            and index == len(owner.body) - 1 and isinstance(node, ast.Return)
            and (node.value is None or (isinstance(node.value, ast.Constant)
                                        and node.value.value is None)))


def _replace(node: ast.AST, new: ast.AST, parents: dict[ast.AST, tuple[ast.AST, str, int | None]]
             ) -> None:
    owner, name, index = parents[node]
    if index is None:
        setattr(owner, name, new)
    else:
        getattr(owner, name)[index] = new


def _op(op: ast.AST) -> str:
    probe = ast.Compare(left=ast.Name("a"), ops=[op], comparators=[ast.Name("b")]) \
        if isinstance(op, ast.cmpop) else ast.BinOp(left=ast.Name("a"), op=op,
                                                    right=ast.Name("b"))
    return ast.unparse(probe)[2:-2]


def _short(node: ast.AST, width: int = 60) -> str:
    text = ast.unparse(node).split("\n")[0]
    return text if len(text) <= width else text[:width - 3] + "..."


def canonical(source: str) -> str:
    return ast.unparse(ast.parse(source))


def mutants(module: str) -> list[Mutant]:
    """Every distinct mutant of ``module`` (a path under the repository), in a stable order."""
    source = (ROOT / module).read_text()
    tree = ast.parse(source)
    parents = _parents(tree)
    skip = _excluded(tree, parents)
    nodes = list(ast.walk(tree))
    canon_nodes = list(ast.walk(ast.parse(canonical(source))))
    seen = {canonical(source)}
    out: list[Mutant] = []
    for index, node in enumerate(nodes):
        if node in skip:
            continue
        for kind, description, apply in _variants(node, parents):
            fresh = copy.deepcopy(tree)
            fresh_nodes = list(ast.walk(fresh))
            apply(fresh_nodes[index], _parents(fresh))
            mutated = ast.unparse(ast.fix_missing_locations(fresh))
            if mutated in seen:
                continue
            seen.add(mutated)
            mutant = Mutant(f"{module}:{len(out) + 1}", getattr(node, "lineno", 0), kind,
                            description, mutated)
            span = canon_nodes[index]
            mutant.span = (getattr(span, "lineno", 0),
                           getattr(span, "end_lineno", 0) or getattr(span, "lineno", 0))
            out.append(mutant)
    return out


# --------------------------------------------------------------------------- running

class Workspace:
    """A scratch copy of the tree for one job; one module is swapped in at a time."""

    def __init__(self, base: Path, name: str) -> None:
        self.root = base / name
        self.root.mkdir()
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        for part in ("sfrtr", "tests"):
            shutil.copytree(ROOT / part, self.root / part, ignore=ignore)
        shutil.copy2(ROOT / "pyproject.toml", self.root / "pyproject.toml")

    def tests(self, target: Target) -> list[str]:
        """``target``'s test files that this copy has (a new one may postdate the copy)."""
        return [t for t in target.tests if (self.root / t).exists()]

    def run(self, target: Target, module_source: str | None, timeout: float,
            trace: Path | None = None) -> tuple[int | None, float]:
        """Run ``target``'s tests with ``module_source`` in place of the module:
        ``(returncode, seconds)``, returncode ``None`` on a timeout."""
        path = self.root / target.module
        original = path.read_text()
        if module_source is not None:
            path.write_text(module_source)
        args = [*PYTEST, *self.tests(target)]
        if target.keyword:
            args += ["-k", target.keyword]
        if trace is None:
            command = [sys.executable, "-m", "pytest", *args]
        else:
            command = [sys.executable, str(Path(__file__).resolve()), "--_trace", str(trace),
                       str(path), "--", *args]
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        env.pop("PYTHONPATH", None)
        started = time.monotonic()
        proc = subprocess.Popen(command, cwd=self.root, env=env, start_new_session=True,  # noqa: S603
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            output, _ = proc.communicate(timeout=timeout)
            code: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            code = None
        finally:
            path.write_text(original)
        self.last_output = output.decode(errors="replace")
        return code, time.monotonic() - started


def _trace_main(out: str, module: str, args: list[str]) -> int:
    """Run pytest in this process, recording the lines of ``module`` it executes."""
    import pytest

    wanted = os.path.realpath(module)
    hits: set[int] = set()
    names: dict[str, bool] = {}

    def local(frame: Any, event: str, _arg: Any) -> Any:
        if event == "line":
            hits.add(frame.f_lineno)
        return local

    def tracer(frame: Any, _event: str, _arg: Any) -> Any:
        name = frame.f_code.co_filename
        mine = names.get(name)
        if mine is None:
            mine = names[name] = os.path.realpath(name) == wanted
        if mine:
            hits.add(frame.f_lineno)
            return local
        return None

    sys.settrace(tracer)
    threading.settrace(tracer)
    code = int(pytest.main(args))
    sys.settrace(None)
    Path(out).write_text(json.dumps(sorted(hits)))
    return code


@dataclass
class Summary:
    module: str
    mutants: int
    killed: int
    survived: int
    score: float
    uncovered: int
    seconds: float
    tests: list[str]
    survivors: list[dict[str, Any]]


def run_target(target: Target, selected: list[Mutant], pool: list[Workspace],
               jobs: int) -> Summary:
    started = time.monotonic()
    source = (ROOT / target.module).read_text()
    trace = pool[0].root / "trace.json"
    code, seconds = pool[0].run(target, canonical(source), timeout=900, trace=trace)
    if code != 0:
        print(pool[0].last_output[-4000:], file=sys.stderr)
        raise SystemExit(f"{target.module}: the tests fail on the unmutated module")
    executed = set(json.loads(trace.read_text()))
    budget = 2 * seconds + 30
    for m in selected:
        first, last = m.span
        m.covered = not executed.isdisjoint(range(first, last + 1))
    # Uncovered mutants run too: the tracer sees this process only, and a test may
    # exercise the module in a child (the memory store's fork guard does).
    todo = list(selected)
    free = list(pool)
    lock = threading.Lock()
    done = 0

    def one(m: Mutant) -> None:
        nonlocal done
        with lock:
            ws = free.pop()
        try:
            code, m.seconds = ws.run(target, m.source, budget)
        finally:
            with lock:
                free.append(ws)
        if code is None:
            m.status = "timeout"
        elif code == 0:
            m.status = "survived"
        elif code in (1, 2, 3, 4):
            m.status = "killed"
        else:
            m.status = "error"
        with lock:
            done += 1
            if m.status in ("survived", "error"):
                print(f"  {m.status:8} {m.id} line {m.line}: {m.description}", flush=True)
            elif done % 25 == 0:
                print(f"  {target.module}: {done}/{len(todo)} run", flush=True)

    with ThreadPoolExecutor(max_workers=jobs) as executor:
        list(executor.map(one, todo))
    killed = sum(m.status in ("killed", "timeout") for m in selected)
    survivors = [m for m in selected if m.status not in ("killed", "timeout")]
    return Summary(
        module=target.module, mutants=len(selected), killed=killed,
        survived=len(survivors), score=round(100 * killed / len(selected), 1) if selected
        else 100.0, uncovered=sum(not m.covered for m in selected),
        seconds=round(time.monotonic() - started, 1),
        tests=[*pool[0].tests(target),
               *(["-k", target.keyword] if target.keyword else [])],
        survivors=[{k: v for k, v in asdict(m).items() if k not in ("source", "seconds")}
                   for m in survivors])


def table(summaries: list[Summary]) -> str:
    lines = ["| module | mutants | killed | survived | score |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for s in summaries:
        lines.append(f"| `{s.module}` | {s.mutants} | {s.killed} | {s.survived} | "
                     f"{s.score:.1f} % |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_trace"]:
        return _trace_main(argv[1], argv[2], argv[4:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--module", action="append", default=[],
                        help="a module of TARGETS (default: all)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/mutants.json")
    parser.add_argument("--list", metavar="MODULE")
    parser.add_argument("--show", metavar="ID")
    parser.add_argument("--rerun", metavar="JSON", help="run only the survivors of a report")
    args = parser.parse_args(argv)

    if args.list:
        for m in mutants(args.list):
            print(f"{m.id:28} line {m.line:4} {m.kind:10} {m.description}")
        return 0
    if args.show:
        module = args.show.rsplit(":", 1)[0]
        found = {m.id: m for m in mutants(module)}[args.show]
        before = canonical((ROOT / module).read_text()).splitlines(keepends=True)
        sys.stdout.writelines(difflib.unified_diff(before, found.source.splitlines(keepends=True),
                                                   module, f"{found.id} ({found.description})"))
        return 0

    targets = [t for t in TARGETS if not args.module or t.module in args.module]
    wanted: dict[str, set[str]] | None = None
    if args.rerun:
        report = json.loads(Path(args.rerun).read_text())
        wanted = {s["module"]: {m["id"] for m in s["survivors"]} for s in report["modules"]}
        targets = [t for t in targets if wanted.get(t.module)]
    summaries: list[Summary] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="sfrtr-mutants-") as tmp:
        pool = [Workspace(Path(tmp), f"w{j}") for j in range(max(1, args.jobs))]
        for target in targets:
            selected = mutants(target.module)
            if wanted is not None:
                selected = [m for m in selected if m.id in wanted[target.module]]
            print(f"{target.module}: {len(selected)} mutants", flush=True)
            summaries.append(run_target(target, selected, pool, args.jobs))
    print()
    print(table(summaries))
    elapsed = round(time.monotonic() - started, 1)
    print(f"\n{elapsed} s with {args.jobs} jobs")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,  # noqa: S607
                            text=True, check=False).stdout.strip()
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"commit": commit, "jobs": args.jobs, "seconds": elapsed,
                               "rerun_of": args.rerun or None,
                               "modules": [asdict(s) for s in summaries]}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
