"""The loss specification: which per-token weighting a run trains with, and its parameters.

Every loss of the project is a weighted cross-entropy (docs/mile-loss.md):

    L = sum_t w_t * ce_t / sum_t w_t,      w_t a DETACHED function of per-token statistics

so a loss is fully described by its weighting: a function of the statistics the vocab-parallel pass already
has per token (ce, and the entropy H when the weighting asks for it), plus its parameters. `LossSpec` is that
description, frozen and validated once (from the run's flags, `LossSpec.from_config`) and handed to the
model and to both autograd paths (megatron_mile.loss.vocab_parallel and
megatron_mile.loss.fused_linear_cross_entropy), which call `LossSpec.token_weight` and ask
`LossSpec.needs_entropy`: the rule "this weighting needs the entropy" lives in the registry below and nowhere
else.

Adding a weighting is one registered function of `TokenStatistics` (and, when it needs a statistic the pass
does not produce yet, one more row in the packed statistics of megatron_mile.loss.shard):

    @register_weighting("my_weighting", needs_entropy=True, parameters=("gamma",))
    def _my_weighting(stats: TokenStatistics, spec: LossSpec) -> torch.Tensor:
        return stats.entropy.pow(spec.gamma)        # [N] fp32, detached

It is then a `--loss-type` choice, and the reference tests can check it against a full-vocabulary version.

A weighting whose token weights depend on the OTHER tokens of the micro-batch (a selection of the hardest
tokens, megatron_mile.loss.selection) registers with `needs_token_scope=True`: the path then gives it a
`TokenScope` (which tokens count, and the process group holding the rest of the micro-batch) and computes the
weights of all the micro-batch's tokens at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from megatron_mile.loss import selection


@dataclass(frozen=True)
class TokenScope:
    """The tokens a weighting that compares tokens selects among, and where the rest of them are.

    counted: [N] bool, the tokens the loss counts (loss_mask > 0 and target not ignored).
    group: the process group whose ranks hold the other tokens of this micro-batch (the data-parallel x
        context-parallel group in training), or None for this process alone.
    """

    counted: torch.Tensor
    group: object = None


@dataclass(frozen=True)
class TokenStatistics:
    """Per-token statistics of the whole (real) vocabulary, fp32 [N], detached.

    ce: cross-entropy log Z - z_target (nats), without label smoothing or z-loss.
    entropy: H = -sum_v p_v log p_v (nats), or None when neither the weighting nor the caller asked for it.
    log_z: log Z = log sum_v exp(z_v), the log-partition function.
    max_prob: the largest predicted probability, max_v p_v = exp(max_v z_v - log Z).
    vocab_size: the real vocabulary size V (e.g. for the normalised entropy H / ln V).
    scope: which tokens count and where the micro-batch's other tokens are; set when the weighting
        needs_token_scope, else None.
    """

    ce: torch.Tensor
    entropy: Optional[torch.Tensor]
    vocab_size: int
    log_z: Optional[torch.Tensor] = None
    max_prob: Optional[torch.Tensor] = None
    scope: Optional[TokenScope] = None

    @property
    def p_target(self) -> torch.Tensor:
        """The predicted probability of the target token, exp(-ce)."""
        return torch.exp(-self.ce)


@dataclass(frozen=True)
class Weighting:
    """A registered per-token weighting: w = weight(stats, spec), detached, [N] fp32."""

    name: str
    weight: Callable[[TokenStatistics, "LossSpec"], torch.Tensor]
    needs_entropy: bool
    parameters: Tuple[str, ...]  # the LossSpec fields it reads (shown in logs and run descriptions)
    description: str
    needs_token_scope: bool = False  # weights depend on the micro-batch's other tokens (TokenScope)


WEIGHTINGS: Dict[str, Weighting] = {}

# selection_fraction of the selection weightings when none is given: Rho-1 trains on 60% of the tokens.
SELECTION_DEFAULT_FRACTION = 0.6


def register_weighting(name: str, *, needs_entropy: bool, parameters: Tuple[str, ...] = (), description: str = "",
                       needs_token_scope: bool = False):
    """Decorator: register `fn(stats: TokenStatistics, spec: LossSpec) -> weight [N]` as loss type `name`.

    needs_token_scope: the weight of a token depends on the other tokens of its micro-batch; `stats.scope`
    is then set, and every token of the micro-batch is weighted in one call (the fused LM head, which weights
    chunk by chunk, refuses such a weighting).
    """

    def register(fn):
        if name in WEIGHTINGS:
            raise ValueError(f"a weighting named {name!r} is already registered")
        WEIGHTINGS[name] = Weighting(name, fn, needs_entropy, tuple(parameters), description or (fn.__doc__ or ""),
                                     needs_token_scope)
        return fn

    return register


@register_weighting("cross_entropy", needs_entropy=False, description="w = 1")
def _uniform_weight(stats: TokenStatistics, spec: "LossSpec") -> torch.Tensor:
    return torch.ones_like(stats.ce)


@register_weighting("focal", needs_entropy=False, parameters=("gamma",), description="w = (1 - p_target)^gamma")
def _focal_weight(stats: TokenStatistics, spec: "LossSpec") -> torch.Tensor:
    # Lin et al. 2017. 1 - p_target = -expm1(-ce): exact for confident tokens where p_target is close to 1.
    return torch.neg(torch.expm1(-stats.ce)).clamp_(min=0.0).pow_(spec.gamma)


@register_weighting("mile", needs_entropy=True, parameters=("gamma", "sigma", "entropy_threshold"),
                    description="w = (sigma + H)^gamma")
def _mile_weight(stats: TokenStatistics, spec: "LossSpec") -> torch.Tensor:
    # MiLe (arXiv 2310.19531, docs/mile-loss.md): w = (sigma + H)^gamma. The optional threshold variant gives
    # weight 1 to tokens whose normalised entropy H / ln V lies below it.
    weight = (spec.sigma + stats.entropy).pow_(spec.gamma)
    if spec.entropy_threshold is not None:
        below = stats.entropy / math.log(stats.vocab_size) < spec.entropy_threshold
        weight = torch.where(below, torch.ones_like(weight), weight)
    return weight


@register_weighting("dft", needs_entropy=False, description="w = p_target")
def _dft_weight(stats: TokenStatistics, spec: "LossSpec") -> torch.Tensor:
    # Probability scaling as in dynamic fine-tuning (DFT, arXiv 2508.05629): each token's cross-entropy is
    # scaled by its own detached predicted probability, the reverse of focal loss (confident tokens count more).
    return stats.p_target


@register_weighting("entropy_selection", needs_entropy=True, needs_token_scope=True,
                    parameters=("selection_fraction",),
                    description="w = 1 for the selection_fraction highest-entropy counted tokens, else 0")
def _entropy_selection_weight(stats: TokenStatistics, spec: "LossSpec") -> torch.Tensor:
    # Selective language modelling (Rho-1, arXiv 2404.07965) without a reference model: train on the
    # tokens the model is most uncertain about. H lies in [0, log V]: fixed histogram bins, one collective.
    keep = selection.top_fraction_mask(stats.entropy, stats.scope.counted, spec.selection_fraction,
                                       stats.scope.group, upper=math.log(stats.vocab_size))
    return keep.float()


@register_weighting("ce_selection", needs_entropy=False, needs_token_scope=True, parameters=("selection_fraction",),
                    description="w = 1 for the selection_fraction highest-cross-entropy counted tokens, else 0")
def _ce_selection_weight(stats: TokenStatistics, spec: "LossSpec") -> torch.Tensor:
    # The same selection scored by the plain cross-entropy (the hardest targets), which has no fixed bound:
    # the histogram spans [0, the largest counted ce of the micro-batch].
    keep = selection.top_fraction_mask(stats.ce, stats.scope.counted, spec.selection_fraction, stats.scope.group)
    return keep.float()


def loss_types() -> Tuple[str, ...]:
    """The registered loss types, in registration order (the --loss-type choices)."""
    return tuple(WEIGHTINGS)


# The built-in loss types (the flag parser's choices are taken from the registry at parse time).
LOSS_TYPES = loss_types()


@dataclass(frozen=True)
class LossSpec:
    """Frozen, validated description of the training loss.

    loss_type: a registered weighting (`loss_types()`): cross_entropy, focal, mile, dft, entropy_selection or
        ce_selection.
    gamma: the exponent of focal and MiLe (>= 0; 0 gives cross-entropy).
    sigma: MiLe's offset (> 0; the paper uses 1).
    entropy_threshold: MiLe only, in [0, 1] or None (off).
    label_smoothing: alpha in [0, 1): the target distribution puts 1 - alpha on the target and spreads alpha
        evenly over the other V - 1 tokens (megatron-core's definition). Any weighting.
    z_loss_coeff: c >= 0: adds c * (log Z)^2 to every token's loss (PaLM's z-loss). Any weighting.
    selection_fraction: entropy_selection / ce_selection only: the share k in (0, 1] of the counted tokens
        of a micro-batch that are kept (weight 1; the others 0). None there resolves to 0.6 (Rho-1's 60%).

    The per-token training loss is l = (1 - s) ce - s mean_v log p_v + c (log Z)^2, s = alpha V / (V - 1),
    weighted and normalised as the main loss: L = sum_t w_t l_t / sum_t w_t. The weight w comes from the
    model's own distribution (ce, H, ...), never from the smoothing or the z-loss.

    Raises ValueError naming the field when a value is out of range.
    """

    loss_type: str = "cross_entropy"
    gamma: float = 1.0
    sigma: float = 1.0
    entropy_threshold: Optional[float] = None
    label_smoothing: float = 0.0
    z_loss_coeff: float = 0.0
    selection_fraction: Optional[float] = None

    def __post_init__(self) -> None:
        if self.loss_type not in WEIGHTINGS:
            raise ValueError(f"loss_type must be one of {loss_types()}, got {self.loss_type!r}")
        gamma, sigma = self.gamma, self.sigma
        if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma >= 0):
            raise ValueError(f"gamma must be a finite number >= 0 (0 gives plain cross-entropy), got {gamma!r}")
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be a finite number > 0 (the paper uses 1.0), got {sigma!r}")
        threshold = self.entropy_threshold
        if threshold is not None:
            if "entropy_threshold" not in self.weighting.parameters:
                raise ValueError(
                    f"entropy_threshold applies to the MiLe loss only; leave it None for {self.loss_type}")
            if not (isinstance(threshold, (int, float)) and 0.0 <= threshold <= 1.0):
                raise ValueError(
                    "entropy_threshold is a normalised entropy H / ln(vocab_size) and must lie in [0, 1], "
                    f"got {threshold!r}"
                )
        ls, zc = self.label_smoothing, self.z_loss_coeff
        if not (isinstance(ls, (int, float)) and 0.0 <= ls < 1.0):
            raise ValueError(f"label_smoothing must lie in [0, 1), got {ls!r}")
        if not (isinstance(zc, (int, float)) and math.isfinite(zc) and zc >= 0):
            raise ValueError(f"z_loss_coeff must be a finite number >= 0 (PaLM uses 1e-4), got {zc!r}")
        # Plain floats, so that the spec hashes, compares and prints the same whatever the caller passed.
        object.__setattr__(self, "label_smoothing", float(ls))
        object.__setattr__(self, "z_loss_coeff", float(zc))
        object.__setattr__(self, "gamma", float(gamma))
        object.__setattr__(self, "sigma", float(sigma))
        if threshold is not None:
            object.__setattr__(self, "entropy_threshold", float(threshold))
        self._resolve_selection_fraction()

    def _resolve_selection_fraction(self) -> None:
        fraction = self.selection_fraction
        if "selection_fraction" not in self.weighting.parameters:
            if fraction is not None:
                raise ValueError(f"selection_fraction applies to the selection weightings only; leave it None for "
                                 f"{self.loss_type}")
            return
        fraction = SELECTION_DEFAULT_FRACTION if fraction is None else fraction
        if not (isinstance(fraction, (int, float)) and 0.0 < fraction <= 1.0):
            raise ValueError(f"selection_fraction is the share of tokens kept and must lie in (0, 1], got {fraction!r}")
        object.__setattr__(self, "selection_fraction", float(fraction))

    @classmethod
    def from_config(cls, loss_config) -> "LossSpec":
        """The spec of a run's LossConfig (megatron_mile.config), whose defaults it resolves."""
        return cls(loss_config.loss_type, loss_config.gamma, loss_config.sigma, loss_config.mile_entropy_threshold,
                   loss_config.label_smoothing, loss_config.z_loss_coeff, loss_config.selection_fraction)

    @property
    def weighting(self) -> Weighting:
        return WEIGHTINGS[self.loss_type]

    @property
    def needs_entropy(self) -> bool:
        """Whether the weight is a function of the entropy (the pass then computes it for free)."""
        return self.weighting.needs_entropy

    @property
    def needs_token_scope(self) -> bool:
        """Whether the weight depends on the micro-batch's other tokens (a selection): the path must give
        the loss mask and the group holding the rest of the micro-batch (TokenScope)."""
        return self.weighting.needs_token_scope

    @property
    def needs_logit_sum(self) -> bool:
        """Whether the loss needs sum_v z_v (label smoothing's mean log-probability): one more statistic."""
        return self.label_smoothing > 0.0

    def token_weight(self, stats: TokenStatistics) -> torch.Tensor:
        """The detached per-token weight [N] fp32 from the statistics [N] (entropy set when needs_entropy)."""
        if self.needs_entropy and stats.entropy is None:
            raise ValueError(f"the {self.loss_type} weighting needs the entropy, and none was computed")
        if self.needs_token_scope and stats.scope is None:
            raise ValueError(f"the {self.loss_type} weighting selects among the micro-batch's tokens and needs "
                             "their TokenScope (which tokens count, which group holds the rest)")
        return self.weighting.weight(stats, self)

    def settings(self) -> Dict[str, float]:
        """The parameters this loss uses: those its weighting reads (when set), and label smoothing and
        z-loss when on. Plain data, for logs, reports and run descriptions."""
        names = list(self.weighting.parameters)
        names += [name for name in ("label_smoothing", "z_loss_coeff") if getattr(self, name) > 0]
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def describe(self) -> str:
        """One line for logs: the loss type and the parameters it uses (settings)."""
        params = ", ".join(f"{name}={value}" for name, value in self.settings().items())
        return f"{self.loss_type} ({params})" if params else self.loss_type


CROSS_ENTROPY = LossSpec("cross_entropy")
