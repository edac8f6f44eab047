"""khod: userspace orchestrator for Linux live update (KHO / LUO) over MQTT."""

__version__ = "0.1.0"
