"""Command-line flags derived from the config dataclasses, in Megatron-LM's spelling.

Each field `foo_bar` of a section in megatron_mile.config becomes `--foo-bar`; its help text is the field's
docstring, read from the source, so the flags and the dataclasses cannot drift apart.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import inspect
import textwrap
import typing
from dataclasses import MISSING, fields
from functools import lru_cache
from typing import Dict, List, Optional, Sequence

from megatron_mile import megatron_lm_flags
from megatron_mile.config import ConfigError, RunConfig

# --help groups, in Megatron-LM's order and with its titles (megatron/training/arguments.py), so a user finds
# a flag where Megatron-LM lists it. A field goes into the group of its section (SECTION_GROUPS) unless
# FIELD_GROUPS names another; the sections without a Megatron-LM counterpart keep their own group.
HELP_GROUPS = (
    "network size", "regularization", "training", "initialization", "learning rate", "checkpointing",
    "mixed precision", "distributed", "validation", "data and dataloader", "tokenizer", "logging",
    "profiling", "loss (MiLe / focal / cross-entropy)", "transformer engine and fused kernels",
)
SECTION_GROUPS = {
    "model": "network size", "parallel": "distributed", "loss": "loss (MiLe / focal / cross-entropy)",
    "optimizer": "learning rate", "data": "data and dataloader", "training": "training",
    "kernels": "transformer engine and fused kernels", "recompute": "training",  # Megatron-LM groups them there
}
FIELD_GROUPS = {
    **dict.fromkeys(("hidden_dropout", "attention_dropout", "weight_decay", "start_weight_decay",
                     "end_weight_decay", "weight_decay_incr_style", "clip_grad", "adam_beta1", "adam_beta2",
                     "adam_eps", "sgd_momentum"), "regularization"),
    **dict.fromkeys(("seed", "init_method_std"), "initialization"),
    **dict.fromkeys(("optimizer", "dataloader_type"), "training"),
    **dict.fromkeys(("bf16", "fp16", "loss_scale", "initial_loss_scale", "min_loss_scale", "loss_scale_window",
                     "hysteresis", "grad_reduce_in_bf16", "accumulate_allreduce_grads_in_fp32",
                     "attention_softmax_in_fp32"), "mixed precision"),
    **dict.fromkeys(("save", "load", "save_interval", "async_save"), "checkpointing"),
    **dict.fromkeys(("eval_interval", "eval_iters"), "validation"),
    **dict.fromkeys(("tokenizer_type", "tokenizer_model", "vocab_file", "merge_file", "vocab_size", "tiktoken_pattern",
                     "tiktoken_num_special_tokens"), "tokenizer"),
    **dict.fromkeys(("log_interval", "tensorboard_dir", "log_entropy_histogram_interval", "no_progress",
                     "log_throughput", "logging_level", "tensorboard_log_interval", "tensorboard_queue_size",
                     "log_params_norm", "log_num_zeros_in_grad", "timing_log_level", "log_timers_to_tensorboard",
                     "log_validation_ppl_to_tensorboard", "log_memory_to_tensorboard", "wandb_project",
                     "wandb_exp_name", "wandb_entity", "wandb_save_dir"), "logging"),
    **dict.fromkeys(("profile", "profile_step_start", "profile_step_end", "profile_ranks",
                     "use_pytorch_profiler"), "profiling"),
    **dict.fromkeys(("distributed_timeout_minutes",), "distributed"),
}


class MegatronArgumentParser(argparse.ArgumentParser):
    """argparse with a short error: one line (no usage dump), and for an unknown flag the nearest known
    flags ("did you mean ...?"), as a mistyped or Megatron-LM-only flag is the common case."""

    def error(self, message: str):  # noqa: D401 - argparse's hook; never returns
        if message.startswith("unrecognized arguments:"):
            unknown = [a.split("=", 1)[0] for a in message.split(":", 1)[1].split() if a.startswith("--")]
            hints = [f"{flag} (did you mean {', '.join(near)}?)" if near else flag
                     for flag, near in ((flag, self.near_misses(flag)) for flag in unknown)]
            if hints:
                message = "unrecognized arguments: " + " ".join(hints)
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists every flag)\n")

    def near_misses(self, flag: str) -> List[str]:
        """Up to three known flags spelled like `flag`."""
        known = [option for option in self._option_string_actions if option.startswith("--")]
        return difflib.get_close_matches(flag, known, n=3, cutoff=0.75)


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
    parser = MegatronArgumentParser(
        prog="pretrain_gpt_mile.py",
        description="Pretrain a GPT/LLaMA model with megatron-core and a MiLe, focal or cross-entropy loss. "
        "Flags follow Megatron-LM's names.",
        allow_abbrev=False,
    )
    groups = {title: parser.add_argument_group(title) for title in HELP_GROUPS}
    defaults = RunConfig()
    for name in RunConfig.SECTIONS:
        cls = type(getattr(defaults, name))
        add_dataclass_arguments(parser, cls, group_of=lambda field_name, name=name: groups[
            FIELD_GROUPS.get(field_name, SECTION_GROUPS[name])])
    for cls in extra_sections:
        add_dataclass_arguments(parser, cls, cls.__name__)
    megatron_lm_flags.add_arguments(parser)
    return parser


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, title: Optional[str] = None,
                            group_of=None) -> None:
    """One `--field-name` flag per field of dataclass `cls`, in an argument group; help = the field docstring.

    Tools with their own settings dataclass (e.g. megatron_mile.evaluation) build their parsers with it, so
    their flags and dataclasses cannot drift apart either. `group_of(field name)` -> the argument group of
    a field (default: one group titled `title` for the whole class).
    """
    if group_of is None:
        group = parser.add_argument_group(title or cls.__name__, (cls.__doc__ or "").strip())
        group_of = lambda _name: group  # noqa: E731
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
        group_of(f.name).add_argument(flag_name, *aliases, **kwargs)


def config_from_namespace(namespace: argparse.Namespace) -> RunConfig:
    """Distribute parsed flags into the RunConfig sections."""
    config = RunConfig()
    for name in RunConfig.SECTIONS:
        section = getattr(config, name)
        for f in fields(section):
            setattr(section, f.name, getattr(namespace, f.name))
    return config


# The flags Megatron-LM requires of every run (its validate_args / pretrain_gpt.py stop without them): the model
# shape, the micro-batch size, and the run length (one of the two).
REQUIRED_FLAGS = ("--num-layers", "--hidden-size", "--num-attention-heads", "--seq-length", "--micro-batch-size")
RUN_LENGTH_FLAGS = ("--train-iters", "--train-samples")


def missing_required_flags(namespace: argparse.Namespace) -> List[str]:
    """The required flags (REQUIRED_FLAGS, and one of RUN_LENGTH_FLAGS) the command line did not give."""
    def given(flag: str) -> bool:
        return getattr(namespace, flag[2:].replace("-", "_"), None) is not None

    missing = [flag for flag in REQUIRED_FLAGS if not given(flag)]
    if not any(given(flag) for flag in RUN_LENGTH_FLAGS):
        missing.append(" or ".join(RUN_LENGTH_FLAGS))
    return missing


def missing_flags_problem(missing: List[str]) -> str:
    """The one start-up line naming every missing required flag."""
    shape = [flag for flag in missing if flag in REQUIRED_FLAGS]
    parts = [f"missing required flags (as in Megatron-LM): {', '.join(shape)}"] if shape else []
    if len(shape) < len(missing):
        parts.append("the run length is required: give --train-iters (steps) or --train-samples")
    return "; ".join(parts)


def parse_args(argv: Optional[List[str]] = None, world_size: int = 1, gpu_available: bool = False,
               kernel_support=None) -> RunConfig:
    """Parse flags into a finalised, validated RunConfig (raises ConfigError with every problem).

    kernel_support: the megatron_mile.kernels.KernelSupport to check kernel flags against (default: this
    machine's).
    """
    namespace = build_parser().parse_args(argv)
    problems = megatron_lm_flags.refusal_problems(namespace)
    missing = missing_required_flags(namespace)
    if missing:
        # Before finalize, which derives defaults from them: no further check is meaningful without them.
        problems.append(missing_flags_problem(missing))
        raise ConfigError("invalid configuration:\n" + "\n".join(f"  - {problem}" for problem in problems))
    if namespace.train_iters is not None and namespace.train_samples is not None:
        # Checked here: finalize derives --train-iters from --train-samples.
        problems.append("give one of --train-iters or --train-samples, not both")
    config = config_from_namespace(namespace)
    config.finalize(world_size, gpu_available, kernel_support)
    config.validate(world_size, gpu_available, kernel_support, extra_problems=problems)
    config.notes += megatron_lm_flags.provided_notes(namespace)
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
