"""examples/: every launch script passes only flags the training CLI accepts, with the paper's
hyperparameters, and each recipe's configuration validates for the world size it is launched with.

The scripts run with DRY_RUN=1, which prints the torchrun command instead of running it.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_mile.arguments import build_parser, parse_args
from megatron_mile.config import ConfigError
from megatron_mile.kernels import KernelSupport
from megatron_mile.planning.recipes import LLAMA, RECIPES

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"

# The paper's table (docs/mile-loss.md): layers, hidden, heads, FFN, seq, global batch, steps, warmup.
PAPER = {
    "468m": dict(num_layers=24, hidden_size=1024, num_attention_heads=16, ffn_hidden_size=4096, seq_length=1024,
                 global_batch_size=1024, train_iters=100_000, lr_warmup_iters=1000),
    "1.2b": dict(num_layers=16, hidden_size=2048, num_attention_heads=8, ffn_hidden_size=8192, seq_length=1024,
                 global_batch_size=1024, train_iters=100_000, lr_warmup_iters=1000),
    "6.7b": dict(num_layers=32, hidden_size=4096, num_attention_heads=32, ffn_hidden_size=11008,
                 seq_length=2048, global_batch_size=2048, train_iters=25_000, lr_warmup_iters=2000),
}
# Flags added by FP8=1 (with their value counts).
FP8_FLAGS = {"--fp8-format": 1, "--fp8-amax-history-len": 1, "--fp8-amax-compute-algo": 1}
# The machine the scripts are written for: H100s in NVIDIA's PyTorch container (Transformer Engine, apex).
H100 = KernelSupport.full(compute_capability=(9, 0))


def dry_run(script: str, **env) -> list:
    """The torchrun command line the script would run, split into arguments."""
    full_env = dict(os.environ, DRY_RUN="1", TOKENIZER_MODEL="/data/llama/tokenizer.model",
                    DATA_PATH="0.7 /data/pile/pile_Pile-CC_text_document 0.3 /data/pile/pile_Github_text_document")
    full_env.update(env)
    out = subprocess.run(["bash", str(EXAMPLES / script)], env=full_env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return shlex.split(out.stdout)


def split_command(argv: list):
    """(torchrun options as a dict, training flags after pretrain_gpt_mile.py)."""
    assert argv[0] == "torchrun"
    script_at = next(i for i, a in enumerate(argv) if a.endswith("pretrain_gpt_mile.py"))
    launcher = argv[1:script_at]
    return dict(zip(launcher[::2], launcher[1::2])), argv[script_at + 1:]


def drop_fp8(flags: list) -> list:
    kept, i = [], 0
    while i < len(flags):
        if flags[i] in FP8_FLAGS:
            i += 1 + FP8_FLAGS[flags[i]]
        else:
            kept.append(flags[i])
            i += 1
    return kept


@pytest.mark.parametrize("recipe", list(PAPER))
@pytest.mark.parametrize("nnodes", [1, 2])
def test_script_flags_exist_and_validate(recipe, nnodes):
    argv = dry_run(f"pretrain_llama_{recipe}.sh", NNODES=str(nnodes), NODE_RANK=str(nnodes - 1),
                   MASTER_ADDR="node0", MASTER_PORT="29500")
    launcher, flags = split_command(argv)
    assert launcher == {"--nproc_per_node": "8", "--nnodes": str(nnodes), "--node_rank": str(nnodes - 1),
                        "--master_addr": "node0", "--master_port": "29500", "--shutdown-timeout": "600"}
    world = 8 * nnodes
    build_parser().parse_args(flags)  # unknown flags exit here with argparse's message
    config = parse_args(flags, world_size=world, gpu_available=True, kernel_support=H100)
    m, o, t, l = config.model, config.optimizer, config.training, config.loss
    for name, value in PAPER[recipe].items():
        section = next(s for s in (m, o, t) if hasattr(s, name))
        assert getattr(section, name) == value, (recipe, name)
    assert (o.lr, o.min_lr, o.lr_decay_style, o.adam_beta1, o.adam_beta2) == (3e-4, 0.0, "cosine", 0.9, 0.95)
    assert (o.weight_decay, o.clip_grad, o.bf16, m.init_method_std) == (0.1, 1.0, True, 0.01)
    assert (m.normalization, m.swiglu, m.position_embedding_type) == ("RMSNorm", True, "rope")
    assert m.untie_embeddings_and_output_weights and m.disable_bias_linear
    assert config.data.tokenizer_type == "SentencePieceTokenizer"
    assert config.kernels.transformer_impl == "transformer_engine" and config.kernels.fp8_format is None
    assert (l.loss_type, l.gamma, l.sigma) == ("mile", 1.0, 1.0)
    # The planner's recipe is what the script launches (so the memory tables in docs/scale.md apply).
    for flag in RECIPES[recipe].shape_flags + LLAMA + RECIPES[recipe].layout_flags:
        assert flag in flags, (recipe, flag)


@pytest.mark.parametrize("recipe", list(PAPER))
def test_paper_world_size_validates(recipe):
    flags = drop_fp8(split_command(dry_run(f"pretrain_llama_{recipe}.sh"))[1])
    parse_args(flags, world_size=RECIPES[recipe].world_size, gpu_available=True, kernel_support=H100)


@pytest.mark.parametrize("recipe", list(PAPER))
def test_fp8_and_fused_lm_head_are_opt_in_and_validate(recipe):
    plain = split_command(dry_run(f"pretrain_llama_{recipe}.sh"))[1]
    fp8 = split_command(dry_run(f"pretrain_llama_{recipe}.sh", FP8="1", FUSED_LM_HEAD="1"))[1]
    assert not set(FP8_FLAGS) & set(plain) and "--fused-lm-head" not in plain
    assert set(FP8_FLAGS) <= set(fp8)
    assert drop_fp8(fp8) == plain + ["--fused-lm-head"]
    config = parse_args(fp8, world_size=RECIPES[recipe].world_size, gpu_available=True, kernel_support=H100)
    k = config.kernels
    assert (k.fp8_format, k.fp8_amax_history_len, k.fp8_amax_compute_algo, k.fused_lm_head) == ("hybrid", 1024, "max", True)
    # An A100 has no FP8: the recipe stops at start-up saying so.
    with pytest.raises(ConfigError, match="--fp8-format hybrid needs a GPU with FP8"):
        parse_args(fp8, world_size=RECIPES[recipe].world_size, gpu_available=True,
                   kernel_support=KernelSupport.full(compute_capability=(8, 0)))


def test_recipes_need_transformer_engine_and_say_so():
    flags = split_command(dry_run("pretrain_llama_468m.sh"))[1]
    with pytest.raises(ConfigError, match=r"--transformer-impl transformer_engine needs Transformer Engine: install"):
        parse_args(flags, world_size=16, gpu_available=True, kernel_support=KernelSupport(compute_capability=(9, 0)))


@pytest.mark.parametrize("loss,expected", [("focal", ["--loss-type", "focal"]),
                                           ("cross_entropy", ["--loss-type", "cross_entropy"])])
def test_loss_type_override_for_baselines(loss, expected):
    flags = split_command(dry_run("pretrain_llama_468m.sh", LOSS_TYPE=loss))[1]
    config = parse_args(flags, world_size=8, gpu_available=True, kernel_support=H100)
    assert config.loss.loss_type == loss and "--mile-gamma" not in flags


def test_bad_loss_type_and_missing_inputs_fail_clearly():
    env = dict(os.environ, DRY_RUN="1", TOKENIZER_MODEL="/t", DATA_PATH="1 /d", LOSS_TYPE="mse")
    out = subprocess.run(["bash", str(EXAMPLES / "pretrain_llama_468m.sh")], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "LOSS_TYPE must be" in out.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("TOKENIZER_MODEL", "DATA_PATH", "DATA_PREFIX")}
    out = subprocess.run(["bash", str(EXAMPLES / "pretrain_llama_468m.sh")], env=dict(env, DRY_RUN="1"),
                         capture_output=True, text=True)
    assert out.returncode != 0 and "TOKENIZER_MODEL" in out.stderr


def test_data_prefix_goes_through_the_pile_blend_tool(tmp_path):
    # Two fake per-domain datasets as tools/preprocess_data.py --split-by-domain names them.
    from megatron_mile.data.pile import domain_prefixes_from_preprocess

    prefixes = domain_prefixes_from_preprocess(str(tmp_path / "pile"), ["Pile-CC", "Github"])
    for prefix in prefixes.values():
        Path(prefix + ".bin").write_bytes(b"")
        Path(prefix + ".idx").write_bytes(b"")
    flags = split_command(dry_run("pretrain_llama_468m.sh", DATA_PATH="", DATA_PREFIX=str(tmp_path / "pile"),
                                  PYTHON=sys.executable))[1]
    data = flags[flags.index("--data-path") + 1: flags.index("--num-workers")]
    assert sorted(data[1::2]) == sorted(prefixes.values())
    assert sum(float(w) for w in data[::2]) == pytest.approx(1.0)


def test_slurm_script_launches_one_torchrun_per_node():
    text = (EXAMPLES / "slurm_pretrain_6.7b.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=1" in text and "#SBATCH --gpus-per-node=8" in text
    assert "srun" in text and "pretrain_llama_6.7b.sh" in text and "SLURM_NODEID" in text
    assert subprocess.run(["bash", "-n", str(EXAMPLES / "slurm_pretrain_6.7b.sbatch")]).returncode == 0


def _run_sbatch(tmp_path, before, after):
    """The Slurm script with stub srun/scontrol: srun moves {save}/summary.json from `before` to `after`
    iterations (None: no summary); returns (exit code, the scontrol calls, output)."""
    stubs, save = tmp_path / "bin", tmp_path / "ckpt"
    stubs.mkdir(parents=True)
    save.mkdir(parents=True)
    summary = lambda done: json.dumps({"iterations": done, "config": {"training": {"train_iters": 25000}}})
    if before is not None:
        (save / "summary.json").write_text(summary(before))
    after_text = summary(after) if after is not None else ""
    (stubs / "srun").write_text(f"#!/bin/bash\nprintf '%s' '{after_text}' > {save}/summary.json\nexit 1\n")
    (stubs / "scontrol").write_text(f"#!/bin/bash\nif [[ $1 == show ]]; then echo node0; else echo \"$@\" >> {tmp_path}/calls; fi\n")
    for stub in ("srun", "scontrol"):
        (stubs / stub).chmod(0o755)
    env = dict(os.environ, PATH=f"{stubs}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node[0-1]", SLURM_JOB_NUM_NODES="2",
               SLURM_SUBMIT_DIR=str(REPO), SLURM_JOB_ID="42", CHECKPOINT_DIR=str(save))
    out = subprocess.run(["bash", str(EXAMPLES / "slurm_pretrain_6.7b.sbatch")], env=env, capture_output=True,
                         text=True, timeout=60)
    calls = (tmp_path / "calls").read_text().split("\n") if (tmp_path / "calls").exists() else []
    return out.returncode, [c for c in calls if c], out.stdout + out.stderr


def test_slurm_script_requeues_a_job_stopped_by_its_signal(tmp_path):
    text = (EXAMPLES / "slurm_pretrain_6.7b.sbatch").read_text()
    assert "#SBATCH --signal=TERM@" in text and "#SBATCH --requeue" in text
    # Progress, not finished (torchrun's own exit code after the signal is 1): requeued.
    code, calls, output = _run_sbatch(tmp_path / "a", before=1000, after=1800)
    assert (code, calls) == (0, ["requeue 42"]), output
    # The first job of the chain (no summary yet) that saved: requeued too.
    code, calls, output = _run_sbatch(tmp_path / "b", before=None, after=300)
    assert (code, calls) == (0, ["requeue 42"]), output
    # No progress (a crash at start-up): not requeued forever; the job fails.
    code, calls, output = _run_sbatch(tmp_path / "c", before=1000, after=1000)
    assert code == 1 and calls == [] and "not requeueing" in output
    # Finished: nothing to do.
    code, calls, output = _run_sbatch(tmp_path / "d", before=24000, after=25000)
    assert (code, calls) == (0, []), output


def test_recipes_stop_cleanly_on_sigterm_and_on_a_time_budget():
    launcher, flags = split_command(dry_run("pretrain_llama_6.7b.sh", EXIT_DURATION_IN_MINS="10070"))
    assert "--exit-signal-handler" in flags and flags[flags.index("--exit-duration-in-mins") + 1] == "10070"
    assert int(launcher["--shutdown-timeout"]) >= 300  # torchrun lets its workers finish the save
    assert "--exit-duration-in-mins" not in split_command(dry_run("pretrain_llama_6.7b.sh"))[1]


def test_compare_losses_refuses_an_unknown_run_before_any_work(tmp_path):
    out = subprocess.run(["bash", str(REPO / "examples" / "compare_losses.sh")], capture_output=True, text=True,
                         env=dict(os.environ, LOSSES="mile softmax", OUT=str(tmp_path / "out")), timeout=300)
    assert out.returncode == 2 and "unknown run 'softmax'" in out.stderr
    assert not (tmp_path / "out" / "mile").exists()
@pytest.mark.parametrize("recipe", list(PAPER))
def test_recipes_overlap_data_parallel_communication_and_mask_document_ends(recipe):
    flags = split_command(dry_run(f"pretrain_llama_{recipe}.sh"))[1]
    config = parse_args(flags, world_size=RECIPES[recipe].world_size, gpu_available=True, kernel_support=H100)
    p, d = config.parallel, config.data
    assert p.use_distributed_optimizer and p.overlap_grad_reduce and p.overlap_param_gather
    assert d.eod_mask_loss and not d.create_attention_mask_in_dataloader  # TE's attention masks causally itself
    assert config.recompute.granularity is None  # opt-in: RECOMPUTE=selective|full


@pytest.mark.parametrize("recompute, expected", [("selective", ("selective", None, None)),
                                                 ("full", ("full", "uniform", 1))])
def test_recomputation_is_opt_in_and_validates(recompute, expected):
    flags = split_command(dry_run("pretrain_llama_6.7b.sh", RECOMPUTE=recompute))[1]
    r = parse_args(flags, world_size=128, gpu_available=True, kernel_support=H100).recompute
    assert (r.granularity, r.recompute_method, r.recompute_num_layers) == expected
    env = dict(os.environ, DRY_RUN="1", TOKENIZER_MODEL="/t", DATA_PATH="1 /d", RECOMPUTE="some")
    out = subprocess.run(["bash", str(EXAMPLES / "pretrain_llama_6.7b.sh")], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "RECOMPUTE must be selective or full" in out.stderr


@pytest.mark.parametrize("recompute", [None, "selective", "full"])
def test_memory_plan_of_the_script_flags_is_the_recipes(recompute):
    """tools/plan_memory.py --recipe 6.7b plans what examples/pretrain_llama_6.7b.sh launches."""
    env = {"RECOMPUTE": recompute} if recompute else {}
    flags = split_command(dry_run("pretrain_llama_6.7b.sh", **env))[1]
    recompute_flags = {None: [], "selective": ["--recompute-activations"],
                       "full": ["--recompute-granularity", "full", "--recompute-method", "uniform",
                                "--recompute-num-layers", "1"]}[recompute]

    def plan(*argv):
        out = subprocess.run([sys.executable, str(REPO / "tools" / "plan_memory.py"), *argv, "--json"],
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout)

    from_script = plan(*flags, "--vocab-size", "32000", "--world-size", str(RECIPES["6.7b"].world_size))
    from_recipe = plan("--recipe", "6.7b", *recompute_flags)
    for key in ("weights", "gradients", "optimizer_states", "activations", "logits_and_loss", "total"):
        assert from_script[key] == from_recipe[key], key
