"""``tests.etcd_worker`` on several etcd endpoints: ``--etcd a,b,c`` (in that
order: the worker talks to ``a`` until it fails over). Everything else is
``tests.etcd_worker`` unchanged."""

from __future__ import annotations

import asyncio
from typing import Any

from sfrtr.store.etcd_client import EtcdSettings
from tests import etcd_worker


def _settings(*, endpoints: list[str], **options: Any) -> EtcdSettings:
    return EtcdSettings(endpoints=[e for joined in endpoints for e in joined.split(",")],
                        **options)


if __name__ == "__main__":
    etcd_worker.EtcdSettings = _settings  # type: ignore[assignment,misc]
    asyncio.run(etcd_worker.main(etcd_worker.parse()))
