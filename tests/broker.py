"""A real Mosquitto for the tests: the simulator's own (free loopback port, stop and restart)."""

from __future__ import annotations

from edgeops_sim.broker import Broker, free_port, mosquitto_binary

__all__ = ["Broker", "free_port", "mosquitto_binary"]
