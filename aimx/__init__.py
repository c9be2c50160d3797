"""aimx: a self-hosted mail server that gives AI agents their own addresses."""

__version__ = "0.1.0"
