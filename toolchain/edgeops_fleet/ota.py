"""Serving a deploy over the air: :mod:`edgeops_core.ota_server`, re-exported for the console.

The announcement (:func:`announce`) and the block server (:class:`BlockServer`) moved to the
contract package so that the fleet simulator, which may not import the host side, serves
blocks with the same code (ADR 0015).
"""

from __future__ import annotations

from edgeops_core.ota_server import BlockServer, DeviceStats, SenderError, TokenBucket, announce

__all__ = ["BlockServer", "DeviceStats", "SenderError", "TokenBucket", "announce"]
