"""What the emulator knows about one refresh token: live, rotated, revoked or unknown.

A measuring tool, not a Salesforce endpoint: it lets a test or a fault run ask
"was this customer's stored refresh token still usable?" without presenting
the token (which would itself rotate or burn it). Tokens are looked up by
value or by :func:`sfrtr.secret.fingerprint` (the first 12 hex digits of their
SHA-256; a longer SHA-256 hex prefix is accepted), and answers never carry a
token value.
"""

from __future__ import annotations

import enum
import hashlib
import itertools
import string

from sfrtr.emulator.state import Family, World
from sfrtr.secret import fingerprint as _fingerprint

FINGERPRINT_LENGTH = len(_fingerprint("x"))


class TokenState(enum.StrEnum):
    LIVE = "live"
    """The family's current refresh token, family not revoked: a redemption would succeed."""
    ROTATED = "rotated"
    """Replaced by a newer one (presenting it now is reuse and revokes the family)."""
    REVOKED = "revoked"
    """Its family was revoked (by reuse or by ``/revoke``): every token of it is dead."""
    UNKNOWN = "unknown"
    """Never issued by this emulator."""


def normalize_fingerprint(value: str) -> str:
    """A fingerprint as :func:`sfrtr.secret.fingerprint` spells it, or ``ValueError``."""
    fp = value.strip().lower()
    if fp.startswith("sha256:"):
        fp = fp[len("sha256:"):]
    if len(fp) < FINGERPRINT_LENGTH or len(fp) > 64 or \
            not all(c in string.hexdigits for c in fp):
        raise ValueError("a fingerprint is 12 to 64 hex digits of the token's SHA-256")
    return fp[:FINGERPRINT_LENGTH]


class TokenStates:
    """Answers state queries over a :class:`World`, with a fingerprint index.

    The world's ``refresh_index`` only ever grows, in insertion order, so the
    index catches up by hashing just the tokens issued since the last query.
    """

    def __init__(self, world: World) -> None:
        self.world = world
        self._by_fingerprint: dict[str, str] = {}
        self._indexed = 0

    def of_token(self, value: str) -> TokenState:
        return self._classify(value, self.world.refresh_index.get(value))

    def of_fingerprint(self, fp: str) -> TokenState:
        value = self._value_of(normalize_fingerprint(fp))
        if value is None:
            return TokenState.UNKNOWN
        return self.of_token(value)

    def _value_of(self, fp: str) -> str | None:
        index = self.world.refresh_index
        if self._indexed > len(index):  # the world was replaced: start over
            self._by_fingerprint.clear()
            self._indexed = 0
        if self._indexed < len(index):
            for value in itertools.islice(index, self._indexed, None):
                digest = hashlib.sha256(value.encode()).hexdigest()[:FINGERPRINT_LENGTH]
                self._by_fingerprint[digest] = value
            self._indexed = len(index)
        return self._by_fingerprint.get(fp)

    @staticmethod
    def _classify(value: str, family: Family | None) -> TokenState:
        if family is None:
            return TokenState.UNKNOWN
        if family.revoked:
            return TokenState.REVOKED
        if value == family.current_refresh:
            return TokenState.LIVE
        return TokenState.ROTATED
