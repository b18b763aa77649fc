"""Aleatoria: a real-time server for random video-chat apps, on trio."""

__version__ = "0.1.0"
