"""forwarder: a health-aware TCP port forwarder that listens only while a backend is alive."""

__version__ = "0.1.0"
