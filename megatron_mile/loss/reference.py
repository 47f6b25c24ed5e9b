"""Plain full-vocabulary implementations of the losses, for tests and for readers.

Everything here works on the whole vocabulary in one process with ordinary autograd, and is written to be
obviously right rather than fast. megatron_mile.loss.vocab_parallel must agree with it on every shard.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F


def reference_weighted_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, *args, **kwargs
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ce, weight, entropy) for full logits [..., V_padded] and targets [...]: reference_token_losses
    without label smoothing or z-loss, where the loss is the cross-entropy (ce keeps its gradient).

    ce = -log softmax(z)[target] over the first `vocab_size` columns; entropy H = -sum p log p (detached);
    weight = (sigma + H)^gamma (mile), (1 - p_target)^gamma (focal), p_target (dft) or 1 (cross_entropy),
    detached. Ignored targets get ce = weight = entropy = 0. The other arguments are reference_token_losses'
    (loss_type, gamma, sigma, vocab_size, entropy_threshold, ignore_index).
    """
    values = reference_token_losses(logits, target, *args, **kwargs)
    return values["loss"], values["weight"], values["entropy"]


def reference_token_losses(
    logits: torch.Tensor,
    target: torch.Tensor,
    loss_type: str = "cross_entropy",
    gamma: float = 1.0,
    sigma: float = 1.0,
    vocab_size: Optional[int] = None,
    entropy_threshold: Optional[float] = None,
    ignore_index: Optional[int] = -100,
    label_smoothing: float = 0.0,
    z_loss_coeff: float = 0.0,
    selection_fraction: Optional[float] = None,
    loss_mask: Optional[torch.Tensor] = None,
) -> Dict[str, torch.Tensor]:
    """Per-token {loss, ce, weight, entropy, z_loss} for full logits [..., V_padded], straight from the
    definitions, in float64 (returned as fp32; loss keeps its gradient to `logits`).

    - the smoothed target puts 1 - alpha on the target and alpha / (V - 1) on every other real token, and
      the loss is its cross-entropy with softmax(z): -(1 - alpha) log p_t - alpha / (V - 1) sum_{v != t} log p_v;
    - z-loss: z_loss_coeff * (logsumexp z)^2, added to the loss;
    - entropy: sum_v entr(p_v), so entries with p = 0 (logits of -inf) add 0;
    - weights as reference_weighted_cross_entropy, plus dft: w = p_target, and the selections
      entropy_selection / ce_selection: w = 1 on reference_top_fraction of the entropy / ce of the counted
      tokens (loss_mask > 0, None: all, and not ignored), exactly, by sorting; selection_fraction None: 0.6.
      All the tokens of `logits` form one selection pool (pass a whole micro-batch, every DP rank's share).
    """
    vocab_size = logits.size(-1) if vocab_size is None else vocab_size
    z = logits[..., :vocab_size].double()
    ignored = target == ignore_index if ignore_index is not None else torch.zeros_like(target, dtype=torch.bool)
    safe_target = torch.where(ignored, torch.zeros_like(target), target)
    log_probs = F.log_softmax(z, dim=-1)
    target_log_prob = log_probs.gather(-1, safe_target.unsqueeze(-1)).squeeze(-1)
    ce = -target_log_prob
    loss = ce
    if label_smoothing > 0:
        others = torch.where(F.one_hot(safe_target, vocab_size).bool(), torch.zeros_like(log_probs), log_probs)
        loss = -(1 - label_smoothing) * target_log_prob - label_smoothing / (vocab_size - 1) * others.sum(-1)
    log_z = torch.logsumexp(z, dim=-1)
    z_loss = z_loss_coeff * log_z ** 2
    loss = loss + z_loss
    with torch.no_grad():
        probs = log_probs.exp()
        entropy = torch.special.entr(probs).sum(-1)
        p_target = probs.gather(-1, safe_target.unsqueeze(-1)).squeeze(-1)
        if loss_type == "mile":
            weight = (sigma + entropy) ** gamma
            if entropy_threshold is not None:
                below = entropy / torch.log(torch.tensor(float(vocab_size), dtype=torch.float64)) < entropy_threshold
                weight = torch.where(below, torch.ones_like(weight), weight)
        elif loss_type == "focal":
            weight = (1.0 - p_target).clamp(min=0.0) ** gamma
        elif loss_type == "dft":
            weight = p_target
        elif loss_type == "cross_entropy":
            weight = torch.ones_like(entropy)
        elif loss_type in ("entropy_selection", "ce_selection"):
            counted = ~ignored if loss_mask is None else (loss_mask > 0) & ~ignored
            scores = entropy if loss_type == "entropy_selection" else ce
            fraction = 0.6 if selection_fraction is None else selection_fraction
            weight = reference_top_fraction(scores, counted, fraction).double()
        else:
            raise ValueError(f"unknown loss_type {loss_type!r}")
        keep = (~ignored).double()
    return {"loss": (loss * keep).float(), "ce": (ce * keep).detach().float(), "weight": (weight * keep).float(),
            "entropy": (entropy * keep).float(), "z_loss": (z_loss * keep).detach().float()}


def reference_top_fraction(scores: torch.Tensor, counted: torch.Tensor, fraction: float) -> torch.Tensor:
    """The exact top share, by sorting: bool, the shape of `scores`, True on the ceil(fraction * n) highest
    of the n counted scores and on every counted score tied with the lowest of them (at least one kept)."""
    values = scores[counted].flatten()
    if values.numel() == 0:
        return torch.zeros_like(counted)
    needed = max(1, math.ceil(round(fraction * values.numel(), 9)))
    cutoff = values.sort(descending=True).values[needed - 1]
    return counted & (scores >= cutoff)


def reference_global_loss(
    ce: torch.Tensor, weight: torch.Tensor, loss_mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """L = sum(w * ce) / sum(w) over the loss-masked tokens of one global batch (docs/mile-loss.md)."""
    mask = torch.ones_like(ce) if loss_mask is None else loss_mask.float()
    return (mask * weight * ce).sum() / (mask * weight).sum()


def naive_mile_loss(
    logits: torch.Tensor, target: torch.Tensor, gamma: float = 1.0, sigma: float = 1.0
) -> torch.Tensor:
    """MiLe as the paper's training code computes it, for the benchmark's memory/time baseline.

    softmax over all logits, clamp at 1e-8, log, entropy, weights normalised by their mean. The project
    does not train with this: it materialises several full-vocabulary fp32 tensors.
    """
    z = logits.float()
    probs = torch.softmax(z, dim=-1)
    log_probs_clamped = torch.log(probs.clamp(min=1e-8))
    with torch.no_grad():
        entropy = -(probs * log_probs_clamped).sum(-1)
        weight = (sigma + entropy) ** gamma
        weight = weight / weight.mean()
    ce = F.nll_loss(log_probs_clamped.view(-1, z.size(-1)), target.reshape(-1), reduction="none")
    return (weight.reshape(-1) * ce).mean()
