"""firmware-sim: simulated devices that run the real agent against a real broker.

``edgeops-sim run SCENARIO.toml`` (:mod:`edgeops_sim.cli`) starts N devices, each a real
:class:`edgeops_agent.daemon.Daemon` with its own data directory, outbox and MQTT session,
fed by the example project's sensor physics (:mod:`edgeops_sim.physics`) with a drift
schedule per cohort and a fault schedule (:mod:`edgeops_sim.scenario`), and writes a
per-device timeline and a summary (:mod:`edgeops_sim.runner`). See docs/simulator.md.

Depends on :mod:`edgeops_agent` and :mod:`edgeops_core` only, like a device.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
