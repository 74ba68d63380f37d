"""edgeops_agent: what ships to a device.

It depends on :mod:`edgeops_core` and device-safe libraries only: never torch, tensorflow or
the toolchain (a test imports it in a fresh interpreter and checks ``sys.modules``).
This release carries offline bundle verification (``edgeops-agent verify``); install,
inference, telemetry, drift detection and OTA updates are not in it yet.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
