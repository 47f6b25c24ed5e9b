"""The field helper every configuration section uses: a dataclass field that carries argparse settings."""

from __future__ import annotations

from dataclasses import field


def flag(default, **argparse_kwargs):
    """A dataclass field with extra argparse settings (choices, nargs, alias flag names)."""
    return field(default=default, metadata=dict(argparse_kwargs))
