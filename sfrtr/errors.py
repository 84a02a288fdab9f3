"""Every exception sfrtr raises, under one root: :class:`SfrtrError`.

Messages name customers and token *fingerprints*, never token values.
"""

from __future__ import annotations


class SfrtrError(Exception):
    """Root of sfrtr's exceptions."""


class ConfigurationError(SfrtrError):
    """sfrtr was set up in a way that cannot work (bad URL, missing secret...)."""


class NotConnected(SfrtrError):
    """No grant is stored for this customer: run the OAuth flow first."""

    def __init__(self, customer: str) -> None:
        super().__init__(f"customer {customer!r} has no stored grant; authorize the app first")
        self.customer = customer


class ReauthorizationRequired(SfrtrError):
    """The customer's grant is dead; only a new authorization brings it back.

    Raised for a rejected refresh token (``invalid_grant``), and for every
    later call until the customer authorizes again, without calling Salesforce.
    """

    def __init__(self, customer: str, reason: str = "") -> None:
        detail = f": {reason}" if reason else ""
        super().__init__(f"customer {customer!r} must re-authorize the app{detail}")
        self.customer = customer
        self.reason = reason


class RefreshIndeterminate(ReauthorizationRequired):
    """A refresh may have rotated the token without sfrtr seeing the answer.

    The rotated token may be lost (the connection dropped after Salesforce
    answered, or a worker died holding it). Under the ``fail_closed`` policy
    the grant is marked for re-authorization rather than risk presenting a
    dead refresh token, which Salesforce treats as theft.
    """


class GrantSuspended(SfrtrError):
    """The grant is alive but sfrtr will not use it until its configuration is fixed.

    A refresh answered 2xx, so its refresh token was rotated; the new refresh token
    was kept, but the rest of the answer was refused (a signature that does not verify,
    an instance URL outside the policy...). Fix the configuration (client secret,
    ``InstanceUrlPolicy``); the next refresh after ``retry_at`` uses the kept token.
    No re-authorization is needed.
    """

    def __init__(self, customer: str, reason: str, retry_at: float) -> None:
        super().__init__(f"customer {customer!r} is suspended: {reason}")
        self.customer = customer
        self.reason = reason
        self.retry_at = retry_at


class SessionRefused(SfrtrError):
    """Salesforce refuses even a freshly refreshed session for this customer.

    A refresh cannot cure this 401 (IP restrictions, API access disabled for the
    user, a session policy), and every refresh burns a rotation, so sfrtr stops
    refreshing the customer until ``retry_at``. ``reason`` carries the provider's
    message.
    """

    def __init__(self, customer: str, reason: str, retry_at: float) -> None:
        super().__init__(f"Salesforce refused a freshly refreshed session for {customer!r} "
                         f"({reason}); not refreshing again before the backoff ends")
        self.customer = customer
        self.reason = reason
        self.retry_at = retry_at


class TokenEndpointUnavailable(SfrtrError):
    """The token endpoint could not be asked, or its answer was lost.

    From a refresh (the token manager): the refresh token is untouched and a
    later retry is safe, nothing was redeemed. From :class:`~sfrtr.OAuthClient`'s
    code exchange, revocation or introspection, the message says whether the
    request was sent: one sent may have been processed (a code used up).
    """


class InvalidTokenResponse(SfrtrError):
    """The token endpoint's answer failed validation; nothing was stored."""


class OAuthError(SfrtrError):
    """The token endpoint refused a request (other than a refresh rejection)."""

    def __init__(self, error: str, description: str = "", status: int = 400) -> None:
        super().__init__(f"{error}: {description}" if description else error)
        self.error = error
        self.description = description
        self.status = status


class CoordinationTimeout(SfrtrError):
    """Waited too long for another worker's refresh to finish."""


class LeaseLost(SfrtrError):
    """This process's coordination lease expired or was revoked.

    Every critical section stops before touching the token endpoint.
    """


class StoreError(SfrtrError):
    """The token store failed (unreachable, corrupt record)."""


class RefusedToClear(SfrtrError):
    """Clearing a customer's record would throw away a usable grant (or the record
    changed meanwhile): see :func:`sfrtr.cli.admin.clear`.

    ``reason`` says why; ``forceable``: ``force=True`` (``sfrtr clear --force``)
    would clear it anyway.
    """

    def __init__(self, reason: str, *, forceable: bool) -> None:
        super().__init__(reason + ("; pass force=True to insist" if forceable else ""))
        self.reason = reason
        self.forceable = forceable


class MissingExtra(SfrtrError, ImportError):
    """A feature needs an optional dependency that is not installed.

    Also an :class:`ImportError`, so code that probes for an optional feature with
    ``except ImportError`` keeps working. The message names the command that
    installs it (``pip install 'sfrtr[etcd]'``).
    """

    def __init__(self, feature: str, extra: str, missing: str | None = None) -> None:
        detail = f" (no module named {missing!r})" if missing else ""
        super().__init__(f"{feature} needs the {extra} extra, which is not installed: "
                         f"pip install 'sfrtr[{extra}]'{detail}")
        self.extra = extra
        self.missing = missing
