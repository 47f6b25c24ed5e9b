"""The memory planner against independent references: megatron-core's own parameter counts (models built
by megatron_mile.model.build_model), memory measured on CPU (process RSS), with and without activation
recomputation, and FLOPs counted by torch.

Nothing here is copied from the planner: every expected number comes from a model that megatron-core
builds and runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_mile.planning.measure import MeasureSpec, measure_in_subprocess
from megatron_mile.planning.memory import Layout, ModelShape, plan, stage_parameters
from megatron_mile.planning.recipes import RECIPES

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20

# name -> (planner shape, training flags of the same model)
SHAPES = {
    "llama": dict(num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=176, vocab_size=1000,
                  seq_length=32),
    "llama_gqa": dict(num_layers=2, hidden_size=128, num_attention_heads=8, num_query_groups=2,
                      ffn_hidden_size=344, vocab_size=1000, seq_length=32),
    "gpt2_tied": dict(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256, vocab_size=1000,
                      seq_length=32, swiglu=False, untie_embeddings_and_output_weights=False,
                      normalization="LayerNorm", add_bias_linear=True, position_embedding_type="learned_absolute"),
}


def training_flags(shape: dict) -> list:
    s = ModelShape(**shape)
    flags = (f"--num-layers {s.num_layers} --hidden-size {s.hidden_size} --num-attention-heads "
             f"{s.num_attention_heads} --ffn-hidden-size {s.ffn_hidden_size} --seq-length {s.seq_length} "
             f"--normalization {s.normalization} --position-embedding-type {s.position_embedding_type} "
             f"--mock-data --tokenizer-type NullTokenizer --vocab-size {s.vocab_size} "
             "--hidden-dropout 0 --attention-dropout 0 --micro-batch-size 1 --train-iters 1").split()
    flags += ["--swiglu"] if s.swiglu else []
    flags += ["--untie-embeddings-and-output-weights"] if s.untie_embeddings_and_output_weights else []
    flags += [] if s.add_bias_linear else ["--disable-bias-linear"]
    if s.num_query_groups:
        flags += ["--group-query-attention", "--num-query-groups", str(s.num_query_groups)]
    return flags


def count_built_parameters(flags, world_size, tp, pp):
    """Worker body: build the model with megatron-core for this rank, count what it holds, count FLOPs."""
    import torch
    from megatron.core import parallel_state, tensor_parallel
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_mile.arguments import parse_args
    from megatron_mile.model import build_model

    tensor_parallel.model_parallel_cuda_manual_seed(1)
    flags = flags + ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]
    config = parse_args(flags, world_size=world_size)
    chunks = build_model(config, config.data.vocab_size)
    params = sum(p.numel() for chunk in chunks for p in chunk.parameters())
    flops = None
    if tp == 1 and pp == 1:
        model = chunks[0]
        b, s = 2, config.model.seq_length
        tokens = torch.randint(0, config.data.vocab_size, (b, s))
        with FlopCounterMode(display=False) as counter:
            out = model(tokens, torch.arange(s).expand(b, s), None, labels=tokens)
            out[..., 0].sum().backward()
        flops = counter.get_total_flops()
    return dict(params=params, stage=parallel_state.get_pipeline_model_parallel_rank(),
                tp_rank=parallel_state.get_tensor_model_parallel_rank(), flops=flops)


@pytest.mark.parametrize("name", list(SHAPES))
def test_parameter_count_and_flops_match_megatron_core(dist_pool, name):
    shape = ModelShape(**SHAPES[name])
    built = dist_pool(1).run(count_built_parameters, training_flags(SHAPES[name]), 1, 1, 1)[0]
    assert stage_parameters(shape, 1, 1, 0) == built["params"]
    # torch's FLOP counter sees every matmul of forward + backward (attention over the full s x s square
    # on CPU), which is what the planner's model-FLOPs formula counts; the batch here is 2 sequences.
    layout = Layout(micro_batch_size=2, global_batch_size=2, precision="fp32", device="cpu")
    assert plan(shape, layout).flops_per_step == built["flops"]


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_per_rank_parameter_count_matches_megatron_core(dist_pool, name, tp, pp):
    shape = ModelShape(**SHAPES[name])
    built = dist_pool(2).run(count_built_parameters, training_flags(SHAPES[name]), 2, tp, pp,
                             tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    for rank in built:
        assert stage_parameters(shape, tp, pp, rank["stage"]) == rank["params"], (name, tp, pp, rank)
    # Tied embeddings with PP: the last stage holds its own copy of the word embeddings.
    if pp == 2:
        assert built[0]["params"] != built[1]["params"]


# Small models measured on CPU, fp32, dropout 0. Large enough (hundreds of MiB) that page and allocator
# granularity is far below 1%; one logits-dominated, one activations-dominated with grouped-query
# attention, one with long sequences where the s^2 attention scores dominate.
MEASURED = {
    "vocab32k": MeasureSpec(num_layers=2, hidden_size=256, ffn_hidden_size=688, num_attention_heads=4,
                            num_query_groups=4, vocab_size=32000, seq_length=512, micro_batch_size=4),
    "gqa_layers": MeasureSpec(num_layers=4, hidden_size=256, ffn_hidden_size=688, num_attention_heads=8,
                              num_query_groups=2, vocab_size=4096, seq_length=512, micro_batch_size=4),
    "long_seq": MeasureSpec(num_layers=2, hidden_size=128, ffn_hidden_size=344, num_attention_heads=4,
                            num_query_groups=4, vocab_size=8000, seq_length=1024, micro_batch_size=2),
}


# Activation recomputation (Megatron-LM's flags) measured the same way: selective on the long sequences where
# the s^2 scores dominate, full with each method; the held activations are then only the recomputed
# groups' inputs (plus the final norm), and backward rebuilds one group at a time.
RECOMPUTED = {
    "long_seq_selective": MeasureSpec(num_layers=2, hidden_size=128, ffn_hidden_size=344, num_attention_heads=4,
                                      num_query_groups=4, vocab_size=8000, seq_length=1024, micro_batch_size=2,
                                      recompute_granularity="selective"),
    "full_uniform": MeasureSpec(num_layers=4, hidden_size=256, ffn_hidden_size=688, num_attention_heads=4,
                                num_query_groups=4, vocab_size=4096, seq_length=512, micro_batch_size=16,
                                recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "full_block": MeasureSpec(num_layers=4, hidden_size=256, ffn_hidden_size=688, num_attention_heads=4,
                              num_query_groups=4, vocab_size=4096, seq_length=512, micro_batch_size=4,
                              recompute_granularity="full", recompute_method="block", recompute_num_layers=2),
}


ALL_MEASURED = {**MEASURED, **RECOMPUTED}


def cpu_plan(spec: MeasureSpec, recompute: bool = True):
    """The planner's CPU profile of the measured model (`recompute=False`: as if it kept every activation)."""
    shape = ModelShape(num_layers=spec.num_layers, hidden_size=spec.hidden_size,
                       num_attention_heads=spec.num_attention_heads, num_query_groups=spec.num_query_groups,
                       ffn_hidden_size=spec.ffn_hidden_size, vocab_size=spec.vocab_size,
                       seq_length=spec.seq_length)
    layout = Layout(micro_batch_size=spec.micro_batch_size, precision="fp32", device="cpu")
    if recompute and spec.recompute_granularity:
        layout = Layout(micro_batch_size=spec.micro_batch_size, precision="fp32", device="cpu",
                        recompute=spec.recompute_granularity, recompute_method=spec.recompute_method or "uniform",
                        recompute_num_layers=spec.recompute_num_layers or 1)
    return plan(shape, layout)


@pytest.fixture(scope="module")
def measured():
    return {name: measure_in_subprocess(spec) for name, spec in ALL_MEASURED.items()}


@pytest.mark.parametrize("name", list(ALL_MEASURED))
def test_activation_memory_matches_cpu_measurement(measured, name):
    got, planned = measured[name], cpu_plan(ALL_MEASURED[name])
    assert got["activations"] > 50 * MIB, "too small to measure reliably: enlarge the config"
    assert planned.activations == pytest.approx(got["activations"], rel=0.15), (
        f"{name}: planned {planned.activations / MIB:.1f} MiB, measured {got['activations'] / MIB:.1f} MiB")


@pytest.mark.parametrize("name", list(MEASURED))
def test_logits_and_loss_memory_matches_cpu_measurement(measured, name):
    got, planned = measured[name], cpu_plan(MEASURED[name])
    # What the step adds beyond the layers' activations until backward leaves the loss and the output
    # layer (the logits, the loss's buffers, the output layer's gradients): the planner's logits/loss figure.
    measured_extra = got["loss_backward_peak"] - got["activations"]
    assert planned.logits_and_loss == pytest.approx(measured_extra, rel=0.15), (
        f"{name}: planned {planned.logits_and_loss / MIB:.1f} MiB, measured {measured_extra / MIB:.1f} MiB")


@pytest.mark.parametrize("name", list(ALL_MEASURED))
def test_step_peak_matches_cpu_measurement(measured, name):
    """The whole step's high-water mark, wherever it falls (output layer, attention backward, or with
    recomputation the rebuilt attention or layer group)."""
    got, planned = measured[name], cpu_plan(ALL_MEASURED[name])
    peak = max(got["forward_peak"], got["backward_peak"])
    planned_peak = planned.activations + planned.logits_and_loss + planned.attention_backward_extra
    assert planned_peak == pytest.approx(peak, rel=0.15), (
        f"{name}: planned {planned_peak / MIB:.1f} MiB, measured {peak / MIB:.1f} MiB")


@pytest.mark.parametrize("name", list(RECOMPUTED))
def test_recomputation_changes_what_the_plan_holds(measured, name):
    # Planned without recomputation, the recomputed runs' measured activations are far off: the comparisons
    # above check the recomputation model, not a number any plan would match.
    assert cpu_plan(RECOMPUTED[name], recompute=False).activations > 1.5 * measured[name]["activations"]


def test_recipe_recomputation_flags_reach_the_planner():
    def activations(*extra):
        out = subprocess.run([sys.executable, str(REPO / "tools" / "plan_memory.py"), "--recipe", "6.7b", "--json",
                              *extra], capture_output=True, text=True, check=True)
        return json.loads(out.stdout)["activations"]

    plain = activations()
    selective = activations("--recompute-activations")
    assert selective == activations("--recompute-granularity", "selective") and selective < plain
    assert activations("--recompute-granularity", "full", "--recompute-method", "uniform",
                       "--recompute-num-layers", "1") < 0.2 * selective


def test_the_cpu_profile_is_needed_for_the_measurement():
    """The GPU profile (flash attention, fused norms) must NOT describe the CPU run: the check has teeth."""
    spec = MEASURED["long_seq"]
    cpu = cpu_plan(spec).activations
    shape = ModelShape(num_layers=spec.num_layers, hidden_size=spec.hidden_size,
                       num_attention_heads=spec.num_attention_heads, ffn_hidden_size=spec.ffn_hidden_size,
                       vocab_size=spec.vocab_size, seq_length=spec.seq_length)
    gpu = plan(shape, Layout(micro_batch_size=spec.micro_batch_size, precision="fp32", device="gpu")).activations
    assert gpu < 0.5 * cpu


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_each_recipe_fits_80gb(recipe):
    out = subprocess.run([sys.executable, str(REPO / "tools" / "plan_memory.py"), "--recipe", recipe, "--json"],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert result["fits"] is True and result["capacity"] == 80e9
    assert result["total"] < 70e9


def test_cli_reports_impossible_layouts_clearly():
    out = subprocess.run([sys.executable, str(REPO / "tools" / "plan_memory.py"), "--recipe", "6.7b",
                          "--tensor-model-parallel-size", "3", "--world-size", "6"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "TP 3 must divide the attention heads" in out.stderr
