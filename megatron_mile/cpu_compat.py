"""Placeholder: the CPU compatibility layer (being written)."""


def enable() -> None:
    """Enable the CPU layer (no-op until written)."""
