"""The invariants every schedule must keep, checked against the models' ground truth.

``docs/protocol.md`` states them; here each becomes a question to the token
endpoint's ledger and to the etcd model's keyspace (read directly, not
through any worker).
"""

from __future__ import annotations

from urllib.parse import quote

import orjson

from sfrtr.records import Status, TokenRecord
from sfrtr.secret import fingerprint

from .world import World

#: Words with which a reauth_required reason names the loss of a rotated token.
LOSS_WORDS = ("lost", "interrupted", "rejected", "revoked", "expired", "concurrently",
              "no usable answer", "invalid_grant")


def _record(world: World, customer: str) -> TokenRecord | None:
    raw = world.etcd.value(b"sim/tok/" + quote(customer, safe="").encode())
    return None if raw is None else TokenRecord.from_dict(orjson.loads(raw))


def _rescued_tokens(world: World, customer: str) -> list[str]:
    prefix = b"sim/rescue/" + quote(customer, safe="").encode() + b"/"
    out = []
    for kv in world.etcd.range(prefix, prefix[:-1] + b"0"):
        out.append(TokenRecord.from_dict(orjson.loads(kv.value)).refresh_token.reveal())
    return out


def check(world: World) -> list[str]:
    """Every violation of the run, most fundamental first."""
    ledger = world.endpoint.ledger
    out: list[str] = []
    for p in ledger.reuse:
        rotated = ledger.answered.get(p.token)
        out.append(f"reuse: {p.worker} presented refresh {p.token} at t={p.at:.3f} after a 2xx "
                   f"answered it at t={rotated if rotated is None else round(rotated, 3)}")
    for at, customer in ledger.revoked_by_reuse:
        out.append(f"revoked: the family of {customer} was revoked for reuse at t={at:.3f}")
    for p in ledger.concurrent:
        out.append(f"concurrent: {p.worker} presented refresh {p.token} at t={p.at:.3f} while "
                   "another request with it was being processed")
    out += _refresh_loops(world)
    if world.loop.spin:
        # The run stopped at the spin: the end state says nothing more.
        return [*out, f"spin: {world.loop.spin}", *world.found.violations]
    out += world.found.violations
    for customer in world.customers:
        if not world.connected[customer]:
            continue
        out += _check_customer(world, customer)
    return out


def _refresh_loops(world: World) -> list[str]:
    """While a customer's API calls are refused whatever the token, a refresh cannot
    help: after the first refused fresh session, no worker redeems for
    ``refused_backoff`` seconds. Each worker may come once more per backoff (its
    skewed clock may see the pause end early), and one refresh may have been on
    its way when the window opened."""
    cfg = world.cfg
    out = []
    for f in world.plan.faults:
        if f.kind != "api_refused":
            continue
        end = f.at + f.span
        n = sum(1 for p in world.endpoint.ledger.presentations
                if p.customer == f.target and f.at <= p.at < end and p.verdict == "accepted")
        limit = cfg.workers * (f.span / cfg.refused_backoff + 1) + 1
        if n > limit:
            out.append(f"refresh loop: {n} redemptions of {f.target} while its API calls were "
                       f"refused for {f.span:.0f}s from t={f.at:.2f} (limit {limit:.0f})")
    return out


def _check_customer(world: World, customer: str) -> list[str]:
    record = _record(world, customer)
    if record is None:
        return [f"loss: {customer} is connected but its record is gone"]
    token = record.refresh_token.reveal()
    fp = fingerprint(token)
    state = world.endpoint.state(token)
    family = world.endpoint.family_of(token)
    out: list[str] = []
    latest = world.latest_family.get(customer)
    if family is not None and latest is not None and family.family_id < latest:
        out.append(f"stale grant: {customer} stores refresh {fp} of family {family.family_id} "
                   f"although it re-authorized (family {latest})")
    status = record.status
    if status is Status.VALID:
        if state != "live":
            live = family.current if family is not None else ""
            where = "a rescue entry" if live in _rescued_tokens(world, customer) else "nowhere"
            out.append(f"silent loss: {customer} is valid with refresh {fp} which is {state} at "
                       f"the provider; the live token is in {where}")
    elif status is Status.REAUTH_REQUIRED:
        # fail_closed is the documented opt-out of invariant 4 (for providers that
        # cannot introspect): it locks out on any unknown outcome, by design. Its runs
        # still check every other invariant.
        if state == "live" and world.cfg.recovery != "fail_closed":
            out.append(f"unjustified lockout: {customer} is reauth_required ({record.reason!r}) "
                       f"but its stored refresh {fp} is live at the provider")
        elif family is not None and not family.revoked and \
                family.current in _rescued_tokens(world, customer):
            out.append(f"stranded rescue: {customer} is reauth_required while a rescue entry "
                       "holds its family's live refresh token")
        elif not any(word in record.reason.lower() for word in LOSS_WORDS):
            out.append(f"unexplained: {customer} is reauth_required with reason "
                       f"{record.reason!r}, which names no loss")
    elif status is Status.SUSPENDED:
        # A grant whose last answer the client refused keeps its live refresh token
        # and resumes after ``refused_backoff``: settled, as long as that is so.
        if state != "live":
            out.append(f"silent loss: {customer} is suspended with refresh {fp} which is "
                       f"{state} at the provider")
    else:
        out.append(f"unsettled: {customer} is {status.value} after the settle phase")
    return out
