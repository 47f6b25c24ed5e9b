"""What the CPU compatibility layer (megatron_mile.cpu_compat) costs per training step, side by side in one run.

One process (gloo, world size 1, 2 threads) trains a small GPT with megatron-core: local spec, RMSNorm, SwiGLU,
rope, no bias; megatron DDP + get_megatron_optimizer (Adam, clip_grad=1.0) and get_forward_backward_func.
Default shape: 4 layers, hidden 256, 4 heads, FFN 688, vocab 32000, seq 256, micro-batch 4, 1 micro-batch
per step, hidden and attention dropout 0.1 (so the RNG tracker forks on every attention layer).

Reported:
1. one-off costs: `import megatron.core` and the first `enable()` (megatron already imported), and a
   disable()+enable() cycle;
2. interceptions per training step: how often each patched entry point runs (counted with sys.setprofile on
   the replacements' code objects, in a separate, untimed step), times its measured extra cost per call
   over the direct CPU equivalent: the layer's added time per step;
3. the alternative the layer avoids: a TorchFunctionMode that maps device='cuda' keyword arguments to the
   CPU. How many torch calls it intercepts per step, its cost per interception, and step time with the mode
   active vs without, measured interleaved (A, B, A, B ...) in the same process. Those steps run with the
   layer enabled in both arms (it is needed to run at all); the difference is the mode alone.

    python benchmarks/bench_cpu_compat.py                       # default shape, 6 timed rounds
    python benchmarks/bench_cpu_compat.py --hidden 128 --vocab 8000 --seq 128 --rounds 4   # quicker
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import timeit

import torch

# None of these imports megatron-core: its import time is measured below.
from _harness import markdown_table

from megatron_mile import cpu_compat, parallel


def _build(args):
    import torch.nn.functional as F
    from megatron.core import tensor_parallel
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.transformer_config import TransformerConfig

    torch.manual_seed(1)
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    config = TransformerConfig(
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        ffn_hidden_size=args.ffn,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        attention_dropout=args.dropout,
        hidden_dropout=args.dropout,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        use_cpu_initialization=True,
        pipeline_dtype=torch.float32,
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=args.vocab,
        max_sequence_length=args.seq,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
    )
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-4, clip_grad=1.0), [ddp])
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (args.micro_batch, args.seq + 1), generator=gen)
    batch = {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "position_ids": torch.arange(args.seq).expand(args.micro_batch, args.seq).contiguous(),
    }
    return ddp, optimizer, batch


def _make_step(args, ddp, optimizer, batch):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model):
        b = next(data_iterator)
        out = model(b["tokens"], b["position_ids"], None, labels=b["labels"])

        def loss_func(per_token):
            loss = per_token.float().mean()
            return loss, {"loss": loss.detach()}

        return out, loss_func

    def step():
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([batch] * args.microbatches),
            model=[ddp],
            num_microbatches=args.microbatches,
            seq_length=args.seq,
            micro_batch_size=args.micro_batch,
            forward_only=False,
        )
        ok, grad_norm, _ = optimizer.step()
        assert ok
        return grad_norm

    return step


# ----------------------------------------------------------------------------------------------------------
# interception counts
# ----------------------------------------------------------------------------------------------------------


def _replacement_code_objects():
    """code object -> label for every Python function the layer installs (namespace factories included)."""
    codes = {}
    seen_namespace = False
    for patch in cpu_compat.PATCHES:
        target = patch.replacement
        if patch.name == "torch":  # the CUDA-literal namespace, shared by several modules
            if seen_namespace:
                continue
            seen_namespace = True
            # All factories share one wrapper code object: counted together.
            for name in cpu_compat._FACTORIES:
                codes[getattr(target, name).__code__] = "namespace factory (CUDA-literal modules)"
            codes[target.autocast.__code__] = "namespace torch.autocast"
            continue
        if isinstance(target, type):
            target = target.__init__
        label = f"{patch.owner}.{patch.name}"
        code = getattr(target, "__code__", None)
        if code is not None:
            codes.setdefault(code, label)  # several torch.cuda stand-ins share _noop/_zero: first label
    return codes


def _count_layer_calls(step):
    codes = _replacement_code_objects()
    counts: dict = {}

    def profiler(frame, event, arg):
        if event == "call":
            label = codes.get(frame.f_code)
            if label is not None:
                counts[label] = counts.get(label, 0) + 1

    sys.setprofile(profiler)
    try:
        step()
    finally:
        sys.setprofile(None)
    return counts


class _CountingCudaToCpuMode(torch.overrides.TorchFunctionMode):
    """The mechanism this layer avoids: map device='cuda' kwargs on every torch call (with a call counter)."""

    def __init__(self, count: bool = False):
        super().__init__()
        self.count = count
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.count:
            self.calls += 1
        if kwargs:
            device = kwargs.get("device")
            if device is not None and (
                (isinstance(device, str) and device.startswith("cuda"))
                or (isinstance(device, torch.device) and device.type == "cuda")
            ):
                kwargs = dict(kwargs, device="cpu")
        else:
            kwargs = {}
        return func(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# per-call costs (microbenchmarks): patched entry point vs its direct CPU equivalent, in microseconds
# ----------------------------------------------------------------------------------------------------------


def _per_call_us(stmt, setup_globals, number=20000):
    timer = timeit.Timer(stmt, globals=setup_globals)
    return min(timer.repeat(repeat=5, number=number)) / number * 1e6


def _per_call_costs():
    import megatron.core.pipeline_parallel.schedules as schedules
    import megatron.core.tensor_parallel.random as mrandom

    t = torch.zeros(4)
    g = {
        "torch": torch,
        "ns": schedules.torch,
        "t": t,
        "cpu": torch.device("cpu"),
        "orig_type": cpu_compat._orig_tensor_type,
        "mrandom": mrandom,
        "gen": torch.default_generator,
        "a": torch.ones(4),
        "b": torch.ones(4),
        "__name__": "megatron.core.bench",  # Tensor.type() sees a megatron caller, as in the optimizer
    }
    state = torch.default_generator.get_state()
    g["state"] = state
    rows = {
        "torch.cuda.current_device": (_per_call_us("torch.cuda.current_device()", g), 0.0),
        "torch.cuda.synchronize": (_per_call_us("torch.cuda.synchronize()", g), 0.0),
        "namespace factory (torch.zeros(1, device='cuda'))": (
            _per_call_us("ns.zeros(1, device='cuda')", g),
            _per_call_us("torch.zeros(1, device=cpu)", g),
        ),
        "Tensor.type() from megatron": (_per_call_us("t.type()", g), _per_call_us("orig_type(t)", g)),
        "RNG get state (tracker fork)": (
            _per_call_us("mrandom._get_cuda_rng_state()", g, 5000),
            _per_call_us("gen.get_state()", g, 5000),
        ),
        "RNG set state (tracker fork)": (
            _per_call_us("mrandom._set_cuda_rng_state(state)", g, 5000),
            _per_call_us("gen.set_state(state)", g, 5000),
        ),
        "Tensor.cuda()": (_per_call_us("t.cuda()", g), 0.0),
    }
    mode_off = _per_call_us("torch.add(a, b)", g)
    with _CountingCudaToCpuMode():
        mode_on = _per_call_us("torch.add(a, b)", g)
    return rows, (mode_on, mode_off)


# ----------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=688)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--microbatches", type=int, default=1)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=6, help="timed A/B pairs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    import megatron.core  # noqa: F401

    t_import = time.perf_counter() - t0
    t0 = time.perf_counter()
    cpu_compat.enable()
    t_enable = time.perf_counter() - t0
    cycles = 50
    t0 = time.perf_counter()
    for _ in range(cycles):
        cpu_compat.disable()
        cpu_compat.enable()
    t_cycle = (time.perf_counter() - t0) / cycles

    parallel.initialize_process_group(backend="gloo")
    parallel.initialize_model_parallel(1, 1)

    ddp, optimizer, batch = _build(args)
    step = _make_step(args, ddp, optimizer, batch)
    step()  # warm-up: buffers, optimizer state

    layer_counts = _count_layer_calls(step)
    mode = _CountingCudaToCpuMode(count=True)
    with mode:
        step()
    mode_calls = mode.calls

    plain, with_mode = [], []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        step()
        plain.append(time.perf_counter() - t0)
        with _CountingCudaToCpuMode():
            t0 = time.perf_counter()
            step()
            with_mode.append(time.perf_counter() - t0)

    costs, (mode_on_us, mode_off_us) = _per_call_costs()
    step_s = statistics.median(plain)
    mode_s = statistics.median(with_mode)

    # Layer overhead estimate: each counted call times its extra cost over the direct CPU equivalent.
    label_to_cost = {
        "torch.cuda.current_device": "torch.cuda.current_device",
        "torch.cuda.synchronize": "torch.cuda.synchronize",
        "torch.Tensor.type": "Tensor.type() from megatron",
        "torch.Tensor.cuda": "Tensor.cuda()",
        "megatron.core.tensor_parallel.random._get_cuda_rng_state": "RNG get state (tracker fork)",
        "megatron.core.tensor_parallel.random._set_cuda_rng_state": "RNG set state (tracker fork)",
    }
    layer_rows = []
    layer_total_us = 0.0
    for label, count in sorted(layer_counts.items(), key=lambda kv: -kv[1]):
        key = label_to_cost.get(label)
        if key is None and label.startswith("namespace factory"):
            key = "namespace factory (torch.zeros(1, device='cuda'))"
        patched, direct = costs.get(key, (float("nan"), 0.0))
        extra = max(patched - direct, 0.0)
        layer_total_us += count * extra
        layer_rows.append((label, count, extra))

    results = {
        "shape": vars(args),
        "import_megatron_core_s": t_import,
        "first_enable_s": t_enable,
        "disable_enable_cycle_s": t_cycle,
        "num_patches": len(cpu_compat.PATCHES),
        "step_s_median": step_s,
        "step_s_all": plain,
        "step_with_mode_s_median": mode_s,
        "step_with_mode_s_all": with_mode,
        "layer_calls_per_step": layer_counts,
        "layer_added_us_per_step": layer_total_us,
        "mode_calls_per_step": mode_calls,
        "mode_us_per_call": mode_on_us - mode_off_us,
        "per_call_us": costs,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)

    n_params = sum(p.numel() for p in ddp.parameters())
    print(f"## model: {args.layers} layers, hidden {args.hidden}, heads {args.heads}, FFN {args.ffn}, "
          f"vocab {args.vocab}, seq {args.seq}, micro-batch {args.micro_batch} x {args.microbatches}, "
          f"dropout {args.dropout}; {n_params / 1e6:.1f} M params; {args.threads} threads")
    print()
    print(markdown_table(["one-off", "time"], [
        ("`import megatron.core`", f"{t_import:.2f} s"),
        (f"first `enable()` (megatron imported; {len(cpu_compat.PATCHES)} patches)", f"{t_enable * 1e3:.2f} ms"),
        ("`disable()` + `enable()`", f"{t_cycle * 1e3:.3f} ms"),
    ]))
    print()
    layer_table = [(label, count, f"{extra:.2f}", f"{count * extra:.1f}") for label, count, extra in layer_rows]
    layer_table.append(("**total**", sum(c for _, c, _ in layer_rows), "",
                        f"**{layer_total_us:.1f}** (= {layer_total_us / 1e6 / step_s:.2e} of a step)"))
    print(markdown_table(["layer entry point", "calls / step", "extra us / call", "us / step"], layer_table))
    print()
    # The machine is shared: the minimum over rounds is the least disturbed measurement of each arm.
    print(markdown_table(["training step, interleaved rounds", "median", "ratio", "min", "ratio"], [
        ("layer enabled", f"{step_s * 1e3:.0f} ms", "1.000", f"{min(plain) * 1e3:.0f} ms", "1.000"),
        ("+ TorchFunctionMode mapping device='cuda' (the avoided alternative)", f"{mode_s * 1e3:.0f} ms",
         f"{mode_s / step_s:.3f}", f"{min(with_mode) * 1e3:.0f} ms", f"{min(with_mode) / min(plain):.3f}"),
    ]))
    print()
    print(f"function mode: {mode_calls} torch calls intercepted per step, "
          f"{mode_on_us - mode_off_us:.2f} us extra per interception (torch.add on 4 elements: "
          f"{mode_off_us:.2f} us without, {mode_on_us:.2f} us with) -> "
          f"{mode_calls * (mode_on_us - mode_off_us) / 1e3:.1f} ms per step estimated")
    print(f"rounds: layer {['%.0f' % (x * 1e3) for x in plain]} ms; "
          f"with mode {['%.0f' % (x * 1e3) for x in with_mode]} ms")


if __name__ == "__main__":
    main()
