"""Fireside: a self-hosted server for the Fireworks Create Completion API."""

__version__ = "0.1.0"
