"""What ``sfrtr demo`` prints: a header saying what runs, progress every second, the
table with a legend, and a verdict line."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from sfrtr.cli.parsing import fmt_seconds

if TYPE_CHECKING:
    from sfrtr.cli.demo import DemoConfig
    from sfrtr.emulator import Emulator

Out = Callable[[str], object]

LEGEND = (
    ("redemptions", "refresh tokens accepted (each one rotates: a new one, the old one dead)"),
    ("reuse", "dead refresh tokens presented again: Salesforce treats that as theft"),
    ("revocations", "grants revoked for reuse: the customer must re-authorize the app"),
    ("concurrent rejections", "refreshes refused: the same token was already being redeemed"),
    ("customers locked out", "customers whose grant is revoked at the end of the run"),
)


def header(out: Out, config: DemoConfig, store: str, *, processes: int) -> None:
    """Say what is simulated, against what, on which store, and what to expect."""
    who = "coroutines" if processes == 1 else f"coroutines in {processes} processes"
    expiries = len(config.expiry_times())
    out(f"sfrtr demo: {config.concurrency} {who} query the Salesforce REST API for "
        f"{config.customers} customers")
    out(f"  for {fmt_seconds(config.duration)}, against the built-in Salesforce emulator: it "
        "rotates refresh tokens")
    out("  and revokes the grant when a dead refresh token is presented, as Salesforce does.")
    times = "once" if expiries == 1 else f"{expiries} times"
    out(f"  Every {fmt_seconds(config.expire_every)} ({times}) it expires every "
        "session: each customer's next call")
    out("  gets a 401 and needs a refresh.")
    out(f"store: {store}")
    if config.naive:
        out("naive: every coroutine that sees a 401 refreshes on its own, as uncoordinated "
            "workers do")
    else:
        out(f"expected: {config.customers} customers x {expiries} expiries = "
            f"{config.customers * expiries} redemptions, no reuse, no customer locked out")


class Progress:
    """One line per second: calls, refreshes and failures per second, lockouts so far."""

    def __init__(self, out: Out, emulator: Emulator, customers: list[str],
                 counts: Callable[[], tuple[int, int]]) -> None:
        self._out = out
        self._emulator = emulator
        self._customers = customers
        self._counts = counts
        self._last = (0.0, 0, 0, 0)

    def tick(self, t: float) -> None:
        """Print the rates since the previous tick (``t``: seconds since the start)."""
        calls, errors = self._counts()
        refreshes = self._emulator.ledger["redemptions"]
        t0, calls0, errors0, refreshes0 = self._last
        span = max(t - t0, 1e-3)
        locked = sum(self._emulator.family_revoked(c) for c in self._customers)
        self._out(f"  {t:5.1f} s  calls {(calls - calls0) / span:8,.0f}/s  refreshes "
                  f"{(refreshes - refreshes0) / span:5,.0f}/s  failures "
                  f"{(errors - errors0) / span:6,.0f}/s  locked out {locked}")
        self._last = (t, calls, errors, refreshes)


def report(out: Out, title: str, config: DemoConfig, figures: dict[str, float],
           kinds: dict[str, int], notes: tuple[str, ...] = ()) -> None:
    """The table, the failures by cause, ``notes``, the legend and the verdict."""
    out(f"\n{title}: {config.customers} customers, {config.concurrency} coroutines, "
        f"{fmt_seconds(config.duration)}, sessions expired every "
        f"{fmt_seconds(config.expire_every)}")
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        if config.naive and key == "expected redemptions":
            continue  # what sfrtr would spend; the naive run has no such expectation
        shown = f"{value:,.1f}" if isinstance(value, float) else f"{value:,}"
        out(f"  {key:<{width}}  {shown:>12}")
    if kinds:
        out("  failures by cause: " + ", ".join(f"{k} {v:,}" for k, v in sorted(kinds.items())))
    for note in notes:
        out(f"  {note}")
    out("legend:")
    for key, text in LEGEND:
        out(f"  {key:<{width}}  {text}")
    out(verdict(config, figures))


def verdict(config: DemoConfig, figures: dict[str, float]) -> str:
    """One line: how many customers were locked out, and whether the invariants held."""
    locked = int(figures["customers locked out"])
    n = config.customers
    reuse = int(figures["reuse"])
    if locked or reuse or figures["revocations"]:
        line = (f"verdict: {locked} of {n} customers locked out, {reuse:,} refresh tokens "
                "reused: ")
        return line + ("this is what sfrtr prevents (run without --naive to compare)"
                       if config.naive else "an invariant did NOT hold")
    redemptions, expected = int(figures["redemptions"]), int(figures["expected redemptions"])
    count = (f"{redemptions} redemptions as expected" if redemptions == expected else
             f"{redemptions} redemptions for {expected} expected (a customer no call reached "
             "after an expiry is not refreshed for it)")
    return (f"verdict: 0 of {n} customers locked out, no refresh token reused, {count}: "
            "the invariants held")
