"""Pointing sfrtr at the emulator: the OAuth settings and grants of its default app.

For demos, benchmarks and tests; a real deployment builds its own ``OAuthConfig``.
"""

from __future__ import annotations

from typing import Any

from sfrtr.emulator.server import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, Emulator
from sfrtr.oauth.client import OAuthConfig
from sfrtr.oauth.grant import TokenGrant, parse_grant
from sfrtr.oauth.instance_url import InstanceUrlPolicy
from sfrtr.secret import Secret


def oauth_config(login_url: str, **overrides: Any) -> OAuthConfig:
    """The emulator's default app, accepting its loopback http instance URL."""
    options: dict[str, Any] = {
        "client_id": DEFAULT_CLIENT_ID,
        "client_secret": Secret(DEFAULT_CLIENT_SECRET),
        "login_url": login_url,
        "instance_policy": InstanceUrlPolicy.for_emulator(),
    }
    options.update(overrides)
    return OAuthConfig(**options)


def token_grant(emulator: Emulator, customer: str, client_id: str = DEFAULT_CLIENT_ID,
                secret: str = DEFAULT_CLIENT_SECRET) -> TokenGrant:
    """A fresh grant for ``customer``, as the code exchange would have returned it."""
    return parse_grant(emulator.grant(customer, client_id),
                       policy=InstanceUrlPolicy.for_emulator(), client_secret=Secret(secret))
