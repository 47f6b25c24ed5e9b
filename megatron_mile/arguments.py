"""Command-line flags derived from the config dataclasses, in Megatron-LM's spelling.

Each field `foo_bar` of a section in megatron_mile.config becomes `--foo-bar`; its help text is the field's
docstring, read from the source, so the flags and the dataclasses cannot drift apart.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import textwrap
import typing
from dataclasses import MISSING, fields
from functools import lru_cache
from typing import Dict, List, Optional, Sequence

from megatron_mile.config import RunConfig


@lru_cache(maxsize=None)
def field_docstrings(cls) -> Dict[str, str]:
    """{field name: the string literal that follows its declaration} for a dataclass."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for statement, following in zip(body, body[1:]):
        if (
            isinstance(statement, ast.AnnAssign)
            and isinstance(statement.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[statement.target.id] = " ".join(following.value.value.split())
    return docs


def _base_type(annotation):
    """int for Optional[int], str for List[str], ... (annotations are strings under __future__)."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing))  # noqa: S307 - our own annotations only
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        return _base_type(next(a for a in typing.get_args(annotation) if a is not type(None)))
    if origin in (list, List):
        return _base_type(typing.get_args(annotation)[0])
    return annotation


def build_parser(extra_sections: Sequence[type] = ()) -> argparse.ArgumentParser:
    """The argparse parser for RunConfig; `extra_sections` lets a tool add its own dataclass."""
    parser = argparse.ArgumentParser(
        prog="pretrain_gpt_mile.py",
        description="Pretrain a GPT/LLaMA model with megatron-core and a MiLe, focal or cross-entropy loss. "
        "Flags follow Megatron-LM's names.",
        allow_abbrev=False,
    )
    defaults = RunConfig()
    sections = [(name, type(getattr(defaults, name))) for name in RunConfig.SECTIONS]
    sections += [(cls.__name__, cls) for cls in extra_sections]
    for section_name, cls in sections:
        add_dataclass_arguments(parser, cls, section_name)
    return parser


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, title: Optional[str] = None) -> None:
    """One `--field-name` flag per field of dataclass `cls`, in an argument group; help = the field docstring.

    Tools with their own settings dataclass (e.g. megatron_mile.evaluation) build their parsers with it, so
    their flags and dataclasses cannot drift apart either.
    """
    group = parser.add_argument_group(title or cls.__name__, (cls.__doc__ or "").strip())
    docs = field_docstrings(cls)
    for f in fields(cls):
        flag_name = "--" + f.name.replace("_", "-")
        kwargs = dict(f.metadata)
        aliases = kwargs.pop("aliases", ())  # other spellings, e.g. Megatron-LM's --override-opt_param-scheduler
        kwargs["help"] = docs.get(f.name, "")
        kwargs["dest"] = f.name
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        kwargs.setdefault("default", default)
        base = _base_type(f.type)
        if base is bool:
            # A plain switch, unless the field asks for --name / --no-name (argparse.BooleanOptionalAction).
            kwargs.setdefault("action", "store_true")
        else:
            kwargs["type"] = base
            if default is not None and "nargs" not in kwargs:
                kwargs["help"] += f" Default: {default}."
        group.add_argument(flag_name, *aliases, **kwargs)


def config_from_namespace(namespace: argparse.Namespace) -> RunConfig:
    """Distribute parsed flags into the RunConfig sections."""
    config = RunConfig()
    for name in RunConfig.SECTIONS:
        section = getattr(config, name)
        for f in fields(section):
            setattr(section, f.name, getattr(namespace, f.name))
    return config


def parse_args(argv: Optional[List[str]] = None, world_size: int = 1, gpu_available: bool = False,
               kernel_support=None) -> RunConfig:
    """Parse flags into a finalised, validated RunConfig (raises ConfigError with every problem).

    kernel_support: the megatron_mile.kernels.KernelSupport to check kernel flags against (default: this
    machine's).
    """
    namespace = build_parser().parse_args(argv)
    config = config_from_namespace(namespace)
    config.finalize(world_size)
    config.validate(world_size, gpu_available, kernel_support)
    return config


def config_to_dict(config: RunConfig) -> dict:
    """Plain nested dict of a RunConfig: written into checkpoints and logs (data, not code)."""
    return {name: {f.name: getattr(getattr(config, name), f.name) for f in fields(getattr(config, name))}
            for name in RunConfig.SECTIONS}


def config_from_dict(values: dict) -> RunConfig:
    """Inverse of config_to_dict; unknown keys (from newer versions) are rejected with their names."""
    config = RunConfig()
    for name, section_values in values.items():
        section = getattr(config, name, None)
        if section is None or name not in RunConfig.SECTIONS:
            raise ValueError(f"unknown config section {name!r}")
        known = {f.name for f in fields(section)}
        unknown = set(section_values) - known
        if unknown:
            raise ValueError(f"unknown settings in section {name!r}: {sorted(unknown)}")
        for key, value in section_values.items():
            setattr(section, key, value)
    return config
