"""A local Salesforce emulator that punishes refresh-token reuse as Salesforce does.

Importable for tests (:class:`Emulator`) and runnable as
``python -m sfrtr.emulator --port 8765``.
"""

from sfrtr.emulator.faults import ENDPOINTS, Faults
from sfrtr.emulator.ledger import EVENTS, Ledger
from sfrtr.emulator.server import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, Emulator
from sfrtr.emulator.token_state import TokenState

__all__ = [
    "DEFAULT_CLIENT_ID",
    "DEFAULT_CLIENT_SECRET",
    "ENDPOINTS",
    "EVENTS",
    "Emulator",
    "Faults",
    "Ledger",
    "TokenState",
]
