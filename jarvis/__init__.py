"""Jarvis: an offline, low-latency voice assistant backend."""

__version__ = "0.1.0"
