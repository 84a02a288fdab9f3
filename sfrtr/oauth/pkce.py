"""PKCE S256 verifier and challenge (RFC 7636)."""

from __future__ import annotations

import base64
import hashlib
import secrets


def make_verifier() -> str:
    """A 64-character high-entropy verifier (RFC 7636 allows 43-128)."""
    return secrets.token_urlsafe(48)


def challenge(verifier: str) -> str:
    """The S256 code challenge of ``verifier``: base64url(SHA-256), unpadded."""
    digest = hashlib.sha256(verifier.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
