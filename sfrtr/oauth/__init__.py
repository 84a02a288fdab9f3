"""OAuth for Salesforce connected apps: the client, its answers, its policies."""

from sfrtr.oauth.client import Introspection, OAuthClient, OAuthConfig
from sfrtr.oauth.grant import TokenGrant
from sfrtr.oauth.instance_url import InstanceUrlPolicy
from sfrtr.oauth.outcome import OutcomeKind, RefreshOutcome

__all__ = ["InstanceUrlPolicy", "Introspection", "OAuthClient", "OAuthConfig", "OutcomeKind",
           "RefreshOutcome", "TokenGrant"]
