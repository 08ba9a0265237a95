"""Errors a user acts on; the CLI turns each into a one-line message and an exit status."""

from __future__ import annotations


class NonFiniteLossError(RuntimeError):
    """Raised after too many non-finite losses in a row (a checkpoint was saved first)."""
