"""A regression of the etcd store's rescue mirror, found by the simulation (seed
87467838): a process's own ``put`` (a re-authorization, which deletes the rescue
entries) whose answer came back after the watch had delivered a newer rescue
entry of another holder cleared that entry from the mirror, so the process held
``[]`` while etcd held ``[14]``. The fold now keeps the revision its rescues are
current at (``_Mirror.rescue_at``) and an older answer never overwrites them."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.sim.plan import draw_plan
from tests.sim.runner import report, run


@pytest.mark.parametrize("mirror", ["namespace", "served"])
def test_an_own_put_answered_late_keeps_a_newer_rescue(mirror: str) -> None:
    seed = 87467838
    plan = draw_plan(seed)
    if plan.config.mirror != mirror:
        plan = replace(plan, config=replace(plan.config, mirror=mirror, idle_after=10.0))
    outcome = run(seed, plan)
    assert not outcome.failed, report(outcome)
