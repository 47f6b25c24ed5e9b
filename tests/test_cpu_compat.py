"""megatron-core's training stack on CPU through `megatron_mile.cpu_compat`, checked against single-process runs.

Every parallel layout (TP=2, PP=2, DP=2 with megatron DDP and its optimizers, bf16) is compared with an
independent one-process run of the same model on the same data: losses, full (unsharded) gradients, gradient
norms and updated parameters. Weights come from a per-name seeded generator rather than from megatron's init,
so any layout starts from exactly the same full model.

Test bodies are module-level functions (spawned pool workers unpickle them by name); one pool per world size
is shared by the whole module. Run with `python -m pytest tests/test_cpu_compat.py`.
"""

from __future__ import annotations

import re
import zlib

import pytest
import torch

from megatron_mile.testing.distributed import DistributedPool, split_evenly

VOCAB = 128
SEQ = 16
MICRO_BATCH = 2
NUM_LAYERS = 2


# ----------------------------------------------------------------------------------------------------------
# helpers run inside the workers
# ----------------------------------------------------------------------------------------------------------


def _config(**overrides):
    import torch.nn.functional as F
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(
        num_layers=NUM_LAYERS,
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=128,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        # Fusions would go through torch.compile on CPU (seconds of compile per test): the plain paths.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        use_cpu_initialization=True,
        pipeline_dtype=torch.float32,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def _global_name(name: str) -> str:
    """Local parameter name -> its name in the one-stage model (pipeline stages number layers from 0)."""
    from megatron.core import parallel_state as ps

    offset = ps.get_pipeline_model_parallel_rank() * (NUM_LAYERS // ps.get_pipeline_model_parallel_world_size())
    name = name.removeprefix("module.").removeprefix("module.")
    return re.sub(r"decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{int(m.group(1)) + offset}.", name)


def _tp_layout(param):
    """(partition dim, stride) of a tensor-parallel parameter, None for a replicated one."""
    if getattr(param, "tensor_model_parallel", False):
        return param.partition_dim, getattr(param, "partition_stride", 1)
    return None


def _set_reference_weights(model) -> None:
    """Give every parameter a value that depends only on its global name: identical full weights in every layout.

    The full tensor is drawn and this rank's shard cut out of it the way megatron's CPU init does
    (`_initialize_affine_weight_cpu`: split into tp*stride chunks, rank r keeps chunks r, r+tp, ...).
    """
    from megatron.core import parallel_state as ps

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for name, param in model.named_parameters():
            gname = _global_name(name)
            layout = _tp_layout(param)
            shape = list(param.shape)
            if layout:
                shape[layout[0]] *= tp
            gen = torch.Generator().manual_seed(zlib.crc32(gname.encode()))
            full = torch.randn(shape, generator=gen, dtype=torch.float32)
            full = 1.0 + 0.1 * full if "layernorm" in gname or "layer_norm" in gname else 0.05 * full
            if layout:
                dim, stride = layout
                chunks = full.chunk(tp * stride, dim=dim)
                full = torch.cat(chunks[rank :: tp], dim=dim)
            param.copy_(full.to(param.dtype))


def _local_tensors(model, attr: str):
    """{global name: (tensor, tp layout)} of a model's params (attr 'data') or grads ('grad' / 'main_grad')."""
    out = {}
    for name, param in model.named_parameters():
        value = param.detach() if attr == "data" else getattr(param, attr)
        assert value is not None, f"{name} has no {attr}"
        out[_global_name(name)] = (value.detach().float().clone(), _tp_layout(param))
    return out


def _batch(index: int):
    """Micro-batch `index`: the same tokens in every layout and on every stage."""
    gen = torch.Generator().manual_seed(1000 + index)
    tokens = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ + 1), generator=gen)
    return {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "position_ids": torch.arange(SEQ).expand(MICRO_BATCH, SEQ).contiguous(),
    }


def _build_gpt(seed: int = 1234, reference_weights: bool = True, **config_overrides):
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    config = _config(**config_overrides)
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
    )
    if reference_weights:
        _set_reference_weights(model)
    return model, config


def _forward_step(data_iterator, model):
    """forward_step_func for megatron's schedules: per-token loss -> mean over the micro-batch."""
    batch = next(data_iterator)
    per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

    def loss_func(output):
        loss = output.float().mean()
        return loss, {"loss": loss.detach().clone()}

    return per_token, loss_func


# ----------------------------------------------------------------------------------------------------------
# test bodies (run on every rank)
# ----------------------------------------------------------------------------------------------------------


def body_single_batch_loss_and_grads(dropout: float = 0.0, seed: int = 1234, recompute: bool = False,
                                     selective: bool = False, skip_rng_replay: bool = False):
    """Plain forward/backward of one batch: loss and every parameter gradient (local shards).

    `recompute`: full recomputation of every layer; `selective`: recompute the core attention only (its
    dropout draws from the tensor-parallel tracker state). `skip_rng_replay` breaks megatron's replay of the
    saved RNG states in recomputation, to show that the comparison would catch it.
    """
    from megatron.core.tensor_parallel import random as megatron_random

    # Recomputation re-runs each checkpointed forward in backward under the RNG states saved in forward
    # (CheckpointFunction -> _get_all_rng_states / _set_all_rng_states).
    extra = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1) if recompute else {}
    if selective:
        extra = dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    model, _ = _build_gpt(seed=seed, attention_dropout=dropout, hidden_dropout=dropout, **extra)
    model.train()
    batch = _batch(0)
    replay = megatron_random._set_all_rng_states
    if skip_rng_replay:
        megatron_random._set_all_rng_states = lambda *states: None
    try:
        loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).mean()
        loss.backward()
    finally:
        megatron_random._set_all_rng_states = replay
    return {"loss": loss.item(), "grads": _local_tensors(model, "grad")}


def body_megatron_init_weights(seed: int):
    """megatron's own CPU init (use_cpu_initialization) after torch.manual_seed + model_parallel_cuda_manual_seed."""
    model, _ = _build_gpt(seed=seed, reference_weights=False)
    return _local_tensors(model, "data")


def body_forward_backward_func(num_microbatches: int):
    """megatron's get_forward_backward_func over `num_microbatches` (pipelined when PP > 1)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model, _ = _build_gpt()
    losses = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iter([_batch(i) for i in range(num_microbatches)]),
        model=[model],
        num_microbatches=num_microbatches,
        seq_length=SEQ,
        micro_batch_size=MICRO_BATCH,
        forward_only=False,
    )
    return {"losses": [d["loss"].item() for d in losses], "grads": _local_tensors(model, "grad")}


def body_train_ddp(
    steps: int,
    global_microbatches: int,
    use_distributed_optimizer: bool,
    overlap_grad_reduce: bool = False,
    bf16: bool = False,
):
    """A few training steps: megatron DDP + get_megatron_optimizer (Adam, clipping); this DP rank gets its
    contiguous share of each step's micro-batches."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.module import Float16Module
    from megatron.core.utils import unwrap_model

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    model, config = _build_gpt(bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32)
    if bf16:
        model = Float16Module(config, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=use_distributed_optimizer,
        bucket_size=4096 if overlap_grad_reduce else None,  # several buckets -> overlapped all-reduces
    )
    ddp_model = DistributedDataParallel(config, ddp_config, model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=1e-2,
            clip_grad=0.5,  # small enough that clipping really scales the gradients
            bf16=bf16,
            use_distributed_optimizer=use_distributed_optimizer,
        ),
        [ddp_model],
    )
    config.no_sync_func = ddp_model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    if overlap_grad_reduce:
        config.grad_sync_func = ddp_model.start_grad_sync

    history = []
    for step in range(steps):
        ids = split_evenly(range(step * global_microbatches, (step + 1) * global_microbatches), dp, dp_rank)
        ddp_model.zero_grad_buffer()
        optimizer.zero_grad()
        losses = get_forward_backward_func()(
            forward_step_func=_forward_step,
            data_iterator=iter([_batch(i) for i in ids]),
            model=[ddp_model],
            num_microbatches=len(ids),
            seq_length=SEQ,
            micro_batch_size=MICRO_BATCH,
            forward_only=False,
        )
        ok, grad_norm, _ = optimizer.step()
        assert ok, "optimizer step reported failure"
        history.append({"losses": [d["loss"].item() for d in losses], "grad_norm": grad_norm})
    inner = unwrap_model(ddp_model)  # DDP, and Float16Module with bf16
    return {
        "history": history,
        "params": _local_tensors(inner, "data"),
        "param_dtypes": sorted({str(p.dtype) for p in inner.parameters()}),
        # get_megatron_optimizer wraps the per-dtype optimizers in a ChainedOptimizer.
        "optimizer": [type(o).__name__ for o in getattr(optimizer, "chained_optimizers", [optimizer])],
    }


def body_rng_tracker():
    """Draw dropout masks from the default stream and from the named tracker states; replay with one seed."""
    import torch.nn.functional as F
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    ones = torch.ones(4096)

    def draw():
        return F.dropout(ones, p=0.5, training=True).ne(0)

    def run(seed):
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        out = {"default_1": draw()}
        with tracker.fork():  # the tensor-model-parallel state
            out["mp_1"] = draw()
        out["default_2"] = draw()
        with tracker.fork():
            out["mp_2"] = draw()
        with tracker.fork(tensor_parallel.get_data_parallel_rng_tracker_name()):
            out["dp_1"] = draw()
        return out

    first, replay, other_seed = run(7), run(7), run(8)
    # Without any fork, the default stream continues exactly as if the forks had not happened.
    tensor_parallel.model_parallel_cuda_manual_seed(7)
    plain = [draw(), draw()]
    return {
        "first": first,
        "replay": replay,
        "other_seed": other_seed,
        "default_stream_plain": plain,
    }


def body_layer_state():
    """Idempotent enable(), faithful disable(), and what each party sees from Tensor.type()."""
    from megatron_mile import cpu_compat

    import megatron.core.pipeline_parallel.schedules as schedules

    try:
        assert cpu_compat.is_enabled()
        patched_current_device = torch.cuda.current_device
        cpu_compat.enable()  # second call: no-op
        assert torch.cuda.current_device is patched_current_device
        assert torch.cuda.current_device() == torch.device("cpu")
        assert schedules.torch is not torch and schedules.torch.zeros([1], device="cuda").device.type == "cpu"
        t = torch.zeros(2)
        megatron_view = eval("t.type()", {"__name__": "megatron.core.fake", "t": t})
        own_view = t.type()

        cpu_compat.disable()
        assert not cpu_compat.is_enabled()
        assert schedules.torch is torch
        assert "type" not in torch.Tensor.__dict__ and "cuda" not in torch.Tensor.__dict__
        try:
            torch.cuda.current_device()
            restored_raises = False
        except (AssertionError, RuntimeError):
            restored_raises = True
        return {"megatron_view": megatron_view, "own_view": own_view, "restored_raises": restored_raises}
    finally:
        cpu_compat.enable()


# ----------------------------------------------------------------------------------------------------------
# helpers run in the test process
# ----------------------------------------------------------------------------------------------------------


def _unshard(per_rank_tensors):
    """[{name: (shard, layout)}] from the ranks of one TP group -> {name: full tensor}."""
    full = {}
    for name, (first, layout) in per_rank_tensors[0].items():
        shards = [r[name][0] for r in per_rank_tensors]
        if layout is None:
            for other in shards[1:]:  # a replicated param must be identical on every TP rank
                torch.testing.assert_close(other, first, rtol=1e-5, atol=1e-6, msg=f"{name} differs across TP ranks")
            full[name] = first
        else:
            dim, stride = layout
            pieces = [s.chunk(stride, dim=dim) for s in shards]
            full[name] = torch.cat([pieces[r][j] for j in range(stride) for r in range(len(shards))], dim=dim)
    return full


def _merge_stages(per_stage):
    """[{name: (tensor, layout)}] from the pipeline stages -> {name: tensor}; no name may appear twice."""
    merged = {}
    for stage in per_stage:
        for name, (value, _) in stage.items():
            assert name not in merged, f"{name} found on two pipeline stages"
            merged[name] = value
    return merged


def _norm(tensors) -> float:
    return torch.sqrt(sum(t.double().pow(2).sum() for t in tensors.values())).item()


def _assert_same_tensors(actual, expected, rtol=1e-4, atol=1e-6, what="gradient"):
    assert sorted(actual) == sorted(expected), f"{what} names differ: {sorted(set(actual) ^ set(expected))}"
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=rtol, atol=atol, msg=f"{what} of {name}")


# ----------------------------------------------------------------------------------------------------------
# fixtures and tests
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool1():
    with DistributedPool(1) as pool:
        yield pool


@pytest.fixture(scope="module")
def pool2():
    with DistributedPool(2) as pool:
        yield pool


def test_enable_refuses_where_cuda_is_available(monkeypatch):
    from megatron_mile import cpu_compat

    if cpu_compat.is_enabled():
        pytest.skip("layer already enabled in the test process")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="CUDA is available"):
        cpu_compat.enable()
    assert not cpu_compat.is_enabled()


def test_enable_refuses_a_patch_target_that_does_not_exist(monkeypatch):
    """A renamed megatron function must stop enable() with its name, not get a useless patch set beside it."""
    import megatron.core.tensor_parallel.random as mrandom
    from megatron.core import package_info

    from megatron_mile import cpu_compat

    was_enabled = cpu_compat.is_enabled()
    cpu_compat.disable()
    original_current_device = torch.cuda.current_device
    table = cpu_compat._patches
    renamed = cpu_compat.Patch("megatron.core.tensor_parallel.random", "_get_cuda_rng_state_renamed",
                               lambda *args, **kwargs: None, "a target megatron-core does not have")
    monkeypatch.setattr(cpu_compat, "_patches", lambda cpu_torch: table(cpu_torch) + [renamed])
    try:
        with pytest.raises(RuntimeError) as refused:
            cpu_compat.enable()
        message = str(refused.value)
        assert "megatron.core.tensor_parallel.random._get_cuda_rng_state_renamed" in message
        assert package_info.__version__ in message
        # Refused before anything was patched: no stray attribute, the real entry points untouched.
        assert not cpu_compat.is_enabled()
        assert not hasattr(mrandom, "_get_cuda_rng_state_renamed")
        assert torch.cuda.current_device is original_current_device
    finally:
        cpu_compat.disable()  # where the refusal failed, the table was applied: undo it
        monkeypatch.undo()
        if was_enabled:
            cpu_compat.enable()


def test_enable_is_idempotent_and_disable_restores(pool1):
    (state,) = pool1.run(body_layer_state)
    assert state["megatron_view"] == "torch.cuda.FloatTensor"  # what megatron's optimizer asserts compare to
    assert state["own_view"] == "torch.FloatTensor"  # everyone else is told the truth
    assert state["restored_raises"], "torch.cuda.current_device() should fail again once the layer is disabled"


def test_tp2_matches_single_process(pool1, pool2):
    (reference,) = pool1.run(body_single_batch_loss_and_grads)
    ranks = pool2.run(body_single_batch_loss_and_grads, tensor_model_parallel_size=2)
    for rank in ranks:
        assert rank["loss"] == pytest.approx(reference["loss"], rel=1e-6, abs=1e-6)
    ref_grads = _unshard([reference["grads"]])
    tp_grads = _unshard([r["grads"] for r in ranks])
    _assert_same_tensors(tp_grads, ref_grads)
    assert _norm(tp_grads) == pytest.approx(_norm(ref_grads), rel=1e-6)
    # The sharded params really are shards (otherwise this test would compare TP=1 with itself).
    assert ranks[0]["grads"]["output_layer.weight"][0].shape[0] == VOCAB // 2


def test_tp2_megatron_cpu_init_matches_single_process(pool1, pool2):
    # The seeding path runs through the layer (torch.cuda.manual_seed and the tracker's state get/set map to the
    # CPU generator): it must leave the CPU stream where torch.manual_seed(seed) put it on every rank, so that
    # megatron's full-size CPU init draws the same master weights for any TP size.
    (reference,) = pool1.run(body_megatron_init_weights, 99)
    ranks = pool2.run(body_megatron_init_weights, 99, tensor_model_parallel_size=2)
    _assert_same_tensors(_unshard(ranks), _unshard([reference]), rtol=0, atol=0, what="initial weight")
    (other_seed,) = pool1.run(body_megatron_init_weights, 100)
    assert not torch.equal(other_seed["output_layer.weight"][0], reference["output_layer.weight"][0])


def test_pp2_schedule_matches_single_process(pool1, pool2):
    microbatches = 4
    (reference,) = pool1.run(body_forward_backward_func, microbatches)
    stages = pool2.run(body_forward_backward_func, microbatches, pipeline_model_parallel_size=2)
    assert stages[0]["losses"] == [], "only the last stage reports losses"
    assert stages[1]["losses"] == pytest.approx(reference["losses"], rel=1e-6)
    pp_grads = _merge_stages([s["grads"] for s in stages])
    ref_grads = _merge_stages([reference["grads"]])
    _assert_same_tensors(pp_grads, ref_grads)
    assert "embedding.word_embeddings.weight" in stages[0]["grads"]
    assert "output_layer.weight" in stages[1]["grads"]


@pytest.mark.parametrize(
    "use_distributed_optimizer, overlap_grad_reduce",
    [(False, False), (True, True)],
    ids=["ddp-allreduce", "distopt-overlap"],
)
def test_dp2_ddp_optimizer_matches_single_process(pool1, pool2, use_distributed_optimizer, overlap_grad_reduce):
    steps, microbatches = 3, 4
    (reference,) = pool1.run(body_train_ddp, steps, microbatches, use_distributed_optimizer, overlap_grad_reduce)
    ranks = pool2.run(body_train_ddp, steps, microbatches, use_distributed_optimizer, overlap_grad_reduce)
    for step, ref in enumerate(reference["history"]):
        dp_losses = ranks[0]["history"][step]["losses"] + ranks[1]["history"][step]["losses"]
        assert dp_losses == pytest.approx(ref["losses"], rel=1e-5), f"losses of step {step}"
        for rank in ranks:
            assert rank["history"][step]["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5), (
                f"grad norm of step {step}"
            )
    # Clipping was active (grad norm above clip_grad=0.5), so the clip path really ran.
    assert reference["history"][0]["grad_norm"] > 0.5
    ref_params = _unshard([reference["params"]])
    for rank in ranks:  # after the step every DP rank holds the full updated model (param all-gather)
        # Adam divides by sqrt(v): fp32 sum-order noise in small gradients shows up as ~1e-6 absolute in the
        # weights, against a step of lr=1e-2 per element; a wrong gradient or a missed gather moves ~lr.
        _assert_same_tensors(_unshard([rank["params"]]), ref_params, rtol=1e-5, atol=2e-5, what="parameter")


def test_bf16_float16module_trains(pool1, pool2):
    steps, microbatches = 2, 4
    (fp32,) = pool1.run(body_train_ddp, steps, microbatches, False)
    (bf16,) = pool1.run(body_train_ddp, steps, microbatches, False, bf16=True)
    ranks = pool2.run(body_train_ddp, steps, microbatches, True, bf16=True)
    # The bf16 path took megatron's Float16 optimizer branch (param.type() == 'torch.cuda.BFloat16Tensor').
    assert bf16["optimizer"] == ["Float16OptimizerWithFloat16Params"]
    assert ranks[0]["optimizer"] == ["DistributedOptimizer"]
    assert bf16["param_dtypes"] == ranks[0]["param_dtypes"] == ["torch.bfloat16"]
    for step in range(steps):
        # bf16 against fp32: the same model within bf16 precision.
        assert bf16["history"][step]["losses"] == pytest.approx(fp32["history"][step]["losses"], rel=2e-2)
        assert bf16["history"][step]["grad_norm"] == pytest.approx(fp32["history"][step]["grad_norm"], rel=5e-2)
        # DP=2 bf16 with the distributed optimizer against one bf16 process: same computation, other sum order.
        dp_losses = ranks[0]["history"][step]["losses"] + ranks[1]["history"][step]["losses"]
        assert dp_losses == pytest.approx(bf16["history"][step]["losses"], rel=1e-3)
        assert ranks[0]["history"][step]["grad_norm"] == pytest.approx(bf16["history"][step]["grad_norm"], rel=1e-4)
    # Same bf16 computation in both layouts: the updated bf16 weights agree to about one bf16 ulp (~5e-4 at the
    # weights' scale), far below one Adam step (lr=1e-2) that a wrong gradient would cause.
    _assert_same_tensors(
        _unshard([ranks[1]["params"]]), _unshard([bf16["params"]]), rtol=0, atol=2e-3, what="bf16 parameter"
    )


def test_rng_tracker_forks_and_differs_across_tp_ranks(pool2):
    ranks = pool2.run(body_rng_tracker, tensor_model_parallel_size=2)
    for rank in ranks:
        first, replay, other = rank["first"], rank["replay"], rank["other_seed"]
        for key in first:
            assert torch.equal(first[key], replay[key]), f"{key}: same seed must give the same mask"
            assert not torch.equal(first[key], other[key]), f"{key}: another seed must give another mask"
        # A named state really advances across forks, and forking never consumes the default stream.
        assert not torch.equal(first["mp_1"], first["mp_2"])
        assert not torch.equal(first["mp_1"], first["default_1"])
        assert torch.equal(first["default_1"], rank["default_stream_plain"][0])
        assert torch.equal(first["default_2"], rank["default_stream_plain"][1])
    r0, r1 = ranks[0]["first"], ranks[1]["first"]
    # megatron's intent: the tensor-model-parallel state differs across TP ranks, the others are shared.
    assert not torch.equal(r0["mp_1"], r1["mp_1"]) and not torch.equal(r0["mp_2"], r1["mp_2"])
    for key in ("default_1", "default_2", "dp_1"):
        assert torch.equal(r0[key], r1[key]), f"{key} must be identical on all TP ranks"


def test_model_dropout_reproducible_under_tp(pool2):
    runs = [pool2.run(body_single_batch_loss_and_grads, 0.3, seed, tensor_model_parallel_size=2) for seed in (5, 5, 6)]
    (a0, a1), (b0, b1), (c0, _) = runs
    assert a0["loss"] == b0["loss"] and a1["loss"] == b1["loss"], "same seed must reproduce the dropout loss"
    _assert_same_tensors(_unshard([b0["grads"], b1["grads"]]), _unshard([a0["grads"], a1["grads"]]), rtol=0, atol=0)
    assert a0["loss"] != c0["loss"], "another seed must change the dropout masks"
    assert a0["loss"] == pytest.approx(a1["loss"], rel=1e-6), "the loss is reduced over the TP group"


def test_activation_recompute_replays_dropout(pool1):
    (plain,) = pool1.run(body_single_batch_loss_and_grads, 0.3, 11)
    (recomputed,) = pool1.run(body_single_batch_loss_and_grads, 0.3, 11, recompute=True)
    (other_seed,) = pool1.run(body_single_batch_loss_and_grads, 0.3, 12, recompute=True)
    assert recomputed["loss"] == plain["loss"]
    # Recompute draws the same dropout masks again in backward: bit-identical gradients.
    _assert_same_tensors(_unshard([recomputed["grads"]]), _unshard([plain["grads"]]), rtol=0, atol=0)
    assert other_seed["loss"] != plain["loss"]


def test_selective_recompute_replays_the_tensor_parallel_dropout(pool2):
    """The recomputed core attention draws its dropout from the TP-rank tracker state inside
    CheckpointFunction: on CPU that state is the default generator's, saved and restored by cpu_compat."""
    plain = pool2.run(body_single_batch_loss_and_grads, 0.3, 11, tensor_model_parallel_size=2)
    recomputed = pool2.run(body_single_batch_loss_and_grads, 0.3, 11, selective=True, tensor_model_parallel_size=2)
    for ours, reference in zip(recomputed, plain):
        assert ours["loss"] == reference["loss"]
    _assert_same_tensors(_unshard([r["grads"] for r in recomputed]), _unshard([r["grads"] for r in plain]),
                         rtol=0, atol=0)
    # Without the replay, backward would recompute other masks: the comparison above would catch it.
    unreplayed = pool2.run(body_single_batch_loss_and_grads, 0.3, 11, selective=True, skip_rng_replay=True,
                           tensor_model_parallel_size=2)
    reference_grads, broken_grads = _unshard([r["grads"] for r in plain]), _unshard([r["grads"] for r in unreplayed])
    assert any(not torch.allclose(broken_grads[name], reference_grads[name], atol=1e-4) for name in reference_grads)
