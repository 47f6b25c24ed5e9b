"""The command line itself: an unknown flag ends with one short line and a suggestion, --help groups flags as
Megatron-LM does, Megatron-LM's provided-by-construction flags are accepted and said in the log, refused
ones stop the run with the reason."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_mile.arguments import build_parser, parse_args
from megatron_mile.config import ConfigError
from megatron_mile.megatron_lm_flags import PROVIDED, REFUSED
from tiny_model import TINY_LLAMA

REPO = Path(__file__).resolve().parents[1]


def run_entry(*argv):
    return subprocess.run([sys.executable, str(REPO / "pretrain_gpt_mile.py"), *argv], capture_output=True,
                          text=True, cwd=REPO, timeout=120)


def parser_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(argv)
    assert stop.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("typo, meant", [("--train-iter", "--train-iters"), ("--micro-batch-sizes", "--micro-batch-size"),
                                         ("--tensor-model-paralel-size", "--tensor-model-parallel-size")])
def test_a_near_miss_gets_one_line_with_a_suggestion(typo, meant, capsys):
    err = parser_error(TINY_LLAMA + [typo, "3"], capsys)
    assert err.count("\n") == 1, err  # one line: no usage dump
    assert f"unrecognized arguments: {typo} (did you mean {meant}" in err, err


def test_a_flag_like_no_other_gets_no_suggestion(capsys):
    err = parser_error(TINY_LLAMA + ["--zzzz-qqqq"], capsys)
    assert "unrecognized arguments: --zzzz-qqqq (" in err and "did you mean" not in err


def test_bad_values_also_end_with_one_line(capsys):
    err = parser_error(TINY_LLAMA + ["--lr-decay-style", "triangle"], capsys)
    assert err.count("\n") == 1 and "--lr-decay-style" in err and "usage:" not in err


def test_entry_script_unknown_flag_is_short():
    proc = run_entry(*TINY_LLAMA, "--train-iter", "3")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "did you mean --train-iters" in proc.stderr


# Megatron-LM's --help groups, and a flag of each that must be listed in it.
GROUP_MEMBERS = {
    "network size": ["--num-layers", "--hidden-size", "--num-attention-heads", "--swiglu"],
    "regularization": ["--weight-decay", "--clip-grad", "--adam-beta2", "--hidden-dropout"],
    "training": ["--micro-batch-size", "--global-batch-size", "--train-iters"],
    "initialization": ["--seed", "--init-method-std"],
    "learning rate": ["--lr", "--min-lr", "--lr-decay-style", "--lr-warmup-iters"],
    "checkpointing": ["--save", "--load", "--save-interval"],
    "mixed precision": ["--bf16"],
    "distributed": ["--tensor-model-parallel-size", "--pipeline-model-parallel-size"],
    "validation": ["--eval-interval", "--eval-iters"],
    "data and dataloader": ["--data-path", "--split", "--num-workers"],
    "tokenizer": ["--tokenizer-type", "--vocab-size"],
    "logging": ["--log-interval", "--tensorboard-dir", "--log-throughput", "--log-params-norm",
                "--log-num-zeros-in-grad", "--timing-log-level", "--tensorboard-log-interval",
                "--tensorboard-queue-size", "--log-timers-to-tensorboard", "--log-validation-ppl-to-tensorboard",
                "--log-memory-to-tensorboard", "--wandb-project", "--wandb-exp-name", "--wandb-entity",
                "--wandb-save-dir"],
}


def help_sections(text: str) -> dict:
    """{group title: the flags listed under it} from argparse's --help output."""
    sections, current = {}, None
    for line in text.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            current = sections.setdefault(line[:-1], [])
        elif current is not None:
            match = re.match(r"\s{2}(--[a-z0-9-]+)", line)
            if match:
                current.append(match.group(1))
    return sections


def test_help_groups_flags_as_megatron_lm_does():
    proc = run_entry("--help")
    assert proc.returncode == 0, proc.stderr
    sections = help_sections(proc.stdout)
    for title, members in GROUP_MEMBERS.items():
        assert title in sections, (title, list(sections))
        for flag in members:
            assert flag in sections[title], (flag, title, sections[title])


# ---------------------------------------------------------------------- provided and refused Megatron-LM flags


def test_provided_flags_are_accepted_and_said_once():
    # --transformer-impl given: its default would add a note of its own (tests/test_kernels.py).
    local = ["--transformer-impl", "local"]
    config = parse_args(TINY_LLAMA + local + ["--use-mcore-models", "--cross-entropy-loss-fusion"], world_size=1)
    assert len(config.notes) == 2
    assert config.notes[0].startswith("--use-mcore-models: ") and "own loss" in config.notes[1]
    assert parse_args(TINY_LLAMA + local, world_size=1).notes == []


@pytest.mark.parametrize("flag", sorted(REFUSED))
def test_each_refused_flag_stops_the_run_with_its_reason(flag):
    values = [] if REFUSED[flag].nargs == 0 else ["2"]
    with pytest.raises(ConfigError) as error:
        parse_args(TINY_LLAMA + [flag, *values], world_size=1)
    lines = [line for line in str(error.value).splitlines() if flag in line]
    assert len(lines) == 1 and REFUSED[flag].instead in lines[0], str(error.value)


def test_provided_and_refused_are_apart_from_the_config_fields():
    parser = build_parser()
    config_flags = {a.option_strings[0] for a in parser._actions if not a.dest.startswith("megatron_lm__")
                    and a.option_strings}
    assert not (set(PROVIDED) | set(REFUSED)) & config_flags


# ---------------------------------------------------------------------- the flags Megatron-LM requires

REQUIRED = {"--num-layers": "4", "--hidden-size": "64", "--num-attention-heads": "4", "--seq-length": "32",
            "--micro-batch-size": "2", "--train-iters": "3"}


def test_the_flags_megatron_lm_requires_are_required():
    data = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "300"]
    with pytest.raises(ConfigError) as error:
        parse_args(data)
    lines = str(error.value).splitlines()[1:]
    assert len(lines) == 1  # one line names them all
    for flag in ("--num-layers", "--hidden-size", "--num-attention-heads", "--seq-length", "--micro-batch-size",
                 "--train-iters"):
        assert flag in lines[0], lines
    complete = [item for flag, value in REQUIRED.items() for item in (flag, value)]
    config = parse_args(data + complete)  # nothing else is required
    assert (config.model.num_layers, config.model.hidden_size, config.training.micro_batch_size) == (4, 64, 2)
    for flag in REQUIRED:
        without = [item for name, value in REQUIRED.items() if name != flag for item in (name, value)]
        with pytest.raises(ConfigError) as error:
            parse_args(data + without)
        (line,) = str(error.value).splitlines()[1:]
        named = [other for other in REQUIRED if other in line]
        assert named == [flag], (flag, line)
    assert parse_args(data + [item for name, value in REQUIRED.items() if name != "--train-iters"
                              for item in (name, value)] + ["--train-samples", "12"]).training.train_iters == 6
