"""The field helper every configuration section uses: a dataclass field that carries argparse settings."""

from __future__ import annotations

from dataclasses import field


def flag(default, **argparse_kwargs):
    """A dataclass field with extra argparse settings (choices, nargs, alias flag names). A list default
    (e.g. Megatron-LM's --profile-ranks 0) is copied for each instance, as dataclasses require."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=dict(argparse_kwargs))
    return field(default=default, metadata=dict(argparse_kwargs))
