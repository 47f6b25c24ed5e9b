"""bf16 output layer, fp32 loss: what FP8 / bf16 training relies on (the output layer is never FP8).

With --bf16 the model runs in Float16Module, so the output layer produces bf16 logits [s, b, V/tp]; the loss
must upcast them to fp32 statistics (max, sum of exps, entropy) instead of summing in bf16, and the loss
and gradients must then follow the fp32 model within bf16 rounding. Checked on CPU against two independent
references: the full-vocabulary fp32 reference loss on the very same bf16 logits (must agree to fp32
precision), and the same model built in fp32 from the same seed (bf16 tolerance), for the unfused output
layer and for --fused-lm-head.
"""

from __future__ import annotations

import pytest
import torch

from megatron_mile.loss import reference_weighted_cross_entropy
from tiny_model import LOSS_FLAGS, TINY_LLAMA, build_tiny_model, tiny_config

VOCAB = 300


def _batch(seq_length: int, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (2, seq_length), generator=gen)  # [b, s]
    labels = torch.randint(0, VOCAB, (2, seq_length), generator=gen)
    loss_mask = (torch.rand(2, seq_length, generator=gen) > 0.2).float()  # some tokens do not count
    positions = torch.arange(seq_length).expand(2, -1)
    return tokens, labels, loss_mask, positions


def _forward_backward(argv):
    """Build the model as training does (Float16Module with --bf16), run one micro-batch through the
    training step's loss function, backpropagate sum(w * ce) / sum(w); return packed output, the logits the
    loss saw (unfused only) and the parameter gradients in fp32."""
    from megatron_mile.model import request_entropy
    from megatron_mile.training.step import LossCollector

    config = tiny_config(argv)
    (chunk,) = build_tiny_model(config, VOCAB)
    model = chunk
    if config.optimizer.bf16:
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(chunk.config, chunk)
    seen = {}
    original = chunk.compute_language_model_loss

    def capture(labels, logits):
        seen["logits"] = logits.detach().clone()
        return original(labels, logits)

    chunk.compute_language_model_loss = capture
    request_entropy([chunk], True)
    tokens, labels, loss_mask, positions = _batch(config.model.seq_length)
    packed = model(tokens, positions, None, labels=labels, loss_mask=loss_mask)  # [b, s, 5]
    collector = LossCollector()
    weighted_sum, _, _ = collector.loss_func(loss_mask, packed)
    (weighted_sum / collector.parts[0].sums[1]).backward()
    grads = {name: p.grad.float().clone() for name, p in chunk.named_parameters() if p.grad is not None}
    weights = {name: p.detach().float().clone() for name, p in chunk.named_parameters()}
    return dict(packed=packed.detach(), logits=seen.get("logits"), grads=grads, weights=weights,
                labels=labels, loss_mask=loss_mask)


def compare_bf16_with_fp32(loss_flags, fused):
    """Worker body: fp32 unfused model vs bf16 model (unfused or fused) from the same seed, at init std 0.02
    (logits of order 1, as in real runs; TINY_LLAMA's 0.25 gives logits of ~30 whose bf16 rounding alone
    is 0.1)."""
    from megatron_mile.model import CE, ENTROPY, WEIGHT

    base = TINY_LLAMA + loss_flags + ["--init-method-std", "0.02"]
    fp32 = _forward_backward(base)
    bf16 = _forward_backward(base + ["--bf16"] + (["--fused-lm-head"] if fused else []))
    report = {}
    # Same initial model: the bf16 weights are the fp32 ones rounded.
    report["same_init"] = all(torch.equal(w.to(torch.bfloat16).float(), bf16["weights"][n])
                              for n, w in fp32["weights"].items())
    if not fused:
        # The loss saw bf16 logits and computed fp32 statistics from them: the fp32 reference on the same
        # values agrees to fp32 precision. A bf16 log-sum-exp would be off by ~1e-2 (checked below).
        logits = bf16["logits"]  # [s, b, V/tp]
        report["logits_dtype"] = str(logits.dtype)
        target = bf16["labels"].t()
        loss_type = loss_flags[1]
        gamma = {"cross_entropy": 0.0, "focal": 2.0, "mile": 1.0}[loss_type]
        ce, weight, entropy = reference_weighted_cross_entropy(logits.float(), target, loss_type, gamma, 1.0, VOCAB)
        packed = bf16["packed"].transpose(0, 1)  # [s, b, 3]
        report["vs_reference_on_bf16_logits"] = max(
            (packed[..., CE] - ce).abs().max().item(),
            (packed[..., WEIGHT] - weight).abs().max().item(),
            (packed[..., ENTROPY] - entropy).abs().max().item(),
        )
        lse_bf16 = torch.logsumexp(logits[..., :VOCAB], dim=-1)  # computed in bf16
        ce_bf16 = lse_bf16.float() - logits[..., :VOCAB].gather(-1, target[..., None]).squeeze(-1).float()
        report["bf16_statistics_would_be_off_by"] = (ce_bf16 - ce).abs().max().item()
    report["packed_dtype"] = str(bf16["packed"].dtype)
    mask = bf16["loss_mask"].bool()
    report["ce_vs_fp32"] = (bf16["packed"][..., CE] - fp32["packed"][..., CE])[mask].abs().max().item()
    report["weight_vs_fp32"] = (bf16["packed"][..., WEIGHT] - fp32["packed"][..., WEIGHT])[mask].abs().max().item()
    report["entropy_vs_fp32"] = (bf16["packed"][..., ENTROPY] - fp32["packed"][..., ENTROPY])[mask].abs().max().item()
    report["loss_fp32"] = (fp32["packed"][..., CE] * fp32["packed"][..., WEIGHT])[mask].sum().item() / \
        fp32["packed"][..., WEIGHT][mask].sum().item()
    report["loss_bf16"] = (bf16["packed"][..., CE] * bf16["packed"][..., WEIGHT])[mask].sum().item() / \
        bf16["packed"][..., WEIGHT][mask].sum().item()
    report["grad_rel_error"] = {
        name: ((bf16["grads"][name] - g).norm() / g.norm()).item() for name, g in fp32["grads"].items()
    }
    report["grad_names"] = (sorted(fp32["grads"]), sorted(bf16["grads"]))
    return report


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused_lm_head"])
@pytest.mark.parametrize("loss", list(LOSS_FLAGS))
def test_bf16_logits_give_fp32_statistics_and_follow_the_fp32_model(dist_pool, loss, fused):
    report = dist_pool(1).run(compare_bf16_with_fp32, LOSS_FLAGS[loss], fused)[0]
    assert report["same_init"]
    assert report["packed_dtype"] == "torch.float32"
    if not fused:
        assert report["logits_dtype"] == "torch.bfloat16"
        assert report["vs_reference_on_bf16_logits"] < 1e-5, report
        assert report["bf16_statistics_would_be_off_by"] > 1e-3, report  # so the check above can tell
    # bf16 activations and logits (seen: ce within 3e-3 per token, the loss within 1e-4 relative, every
    # gradient within 1.1% in norm); a bf16 log-sum-exp alone would move ce by 3e-2.
    assert report["ce_vs_fp32"] < 1e-2 and report["entropy_vs_fp32"] < 1e-2, report
    assert report["weight_vs_fp32"] < 1e-2, report
    assert abs(report["loss_bf16"] - report["loss_fp32"]) < 1e-3 * report["loss_fp32"], report
    names_fp32, names_bf16 = report["grad_names"]
    assert names_fp32 == names_bf16 and len(names_fp32) > 10
    worst = max(report["grad_rel_error"].items(), key=lambda item: item[1])
    assert worst[1] < 3e-2, worst
