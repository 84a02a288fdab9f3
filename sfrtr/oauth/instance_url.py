"""Where bearer tokens may be sent: the instance URL policy.

The token endpoint's ``instance_url`` decides where every later API call,
and so every access token, goes. A tampered or misconfigured answer must not
be able to send tokens to an arbitrary host.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from sfrtr.errors import InvalidTokenResponse

#: Domains Salesforce serves orgs from (production, sandboxes, government, China).
SALESFORCE_DOMAINS = (
    "salesforce.com",
    "force.com",
    "cloudforce.com",
    "salesforce.mil",
    "sfcrmproducts.cn",
    "salesforce-sites.com",
)


@dataclass(frozen=True, slots=True)
class InstanceUrlPolicy:
    """Which instance URLs to accept.

    By default: ``https`` on a Salesforce domain. ``allow_loopback_http``
    admits ``http://127.0.0.1``/``localhost`` on any port, for the emulator.
    """

    domains: tuple[str, ...] = SALESFORCE_DOMAINS
    allow_loopback_http: bool = False

    @classmethod
    def for_emulator(cls) -> InstanceUrlPolicy:
        """Loopback ``http`` URLs only: what the emulator's answers name."""
        return cls(domains=(), allow_loopback_http=True)

    def validate(self, url: object) -> str:
        """The URL's origin (scheme://host[:port]) if allowed; else raise."""
        if not isinstance(url, str) or not url:
            raise InvalidTokenResponse("instance_url is missing or not a string")
        # Every answer of an org names the same instance: remember what passed (a
        # refused URL is looked at again each time, and raises again).
        key = (self, url)
        try:
            origin = _ALLOWED.get(key)
        except TypeError:  # domains given as a list: unhashable, so never cached
            return self._validate(url)
        if origin is None:
            origin = self._validate(url)
            if len(_ALLOWED) >= _ALLOWED_MAX:
                _ALLOWED.clear()
            _ALLOWED[key] = origin
        return origin

    def _validate(self, url: str) -> str:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise InvalidTokenResponse("instance_url is not a valid URL") from None
        host = (parts.hostname or "").lower()
        if not host or parts.username or parts.password or parts.query or parts.fragment or \
                parts.path not in ("", "/"):
            raise InvalidTokenResponse("instance_url must be a bare origin")
        origin = f"{parts.scheme}://{host}" + (f":{port}" if port else "")
        if parts.scheme == "https" and any(
                host == d or host.endswith("." + d) for d in self.domains):
            return origin
        if self.allow_loopback_http and parts.scheme in ("http", "https") and _loopback(host):
            return origin
        raise InvalidTokenResponse(f"instance_url host {host!r} is not allowed by the policy")


_ALLOWED: dict[tuple[InstanceUrlPolicy, str], str] = {}
_ALLOWED_MAX = 4096


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
