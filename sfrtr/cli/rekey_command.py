"""``sfrtr rekey``: :func:`sfrtr.rekey` against a store, with the key ring in
``$SFRTR_KEYS`` (step 4 of the key rotation runbook in ``docs/security.md``)."""

from __future__ import annotations

import argparse
import asyncio

from sfrtr.cli import CommandFailed
from sfrtr.cli.stores import KEYS_ENV, env_sealer, open_store, where


def run_rekey(args: argparse.Namespace) -> int:
    """Re-seal the store's records; 0 when all were, 1 when some stayed busy."""
    from sfrtr.errors import SfrtrError
    from sfrtr.store.sealing import RekeyReport, SealingError, rekey

    place = where(args)
    sealer = env_sealer(required=True)  # no key ring: one line naming $SFRTR_KEYS
    assert sealer is not None

    async def run() -> RekeyReport:
        store = open_store(args, sealer)
        try:
            return await rekey(store, busy_wait=args.busy_wait)
        finally:
            await store.aclose()

    try:
        report = asyncio.run(run())
    except SealingError as exc:
        raise CommandFailed(f"{place}: {exc} (the key ring comes from ${KEYS_ENV}: "
                            "id:base64-key[,...], newest last; nothing more was written)"
                            ) from exc
    except (SfrtrError, OSError) as exc:
        raise CommandFailed(f"{place}: {exc}") from exc
    busy = report.busy or []
    print(f"{place}: resealed {report.resealed} record(s) and {report.rescues} rescue "
          f"entr{'y' if report.rescues == 1 else 'ies'} with key {sealer.ring.current!r}"
          + (f"; busy (held by a refresh, run again): {', '.join(busy)}" if busy else ""))
    return 1 if busy else 0
