"""The config sections of the "student-aware" parts of a run (``distillation.moe``, ``distillation.router``,
``distillation.curriculum``); README, "What student-aware means in sakd", explains each with its numbers."""

from __future__ import annotations

from dataclasses import dataclass

from sakd.config.fields import documented as _f


@dataclass
class MoEConfig:
    augment_samples: int = _f(
        0,
        "Knowledge Augmentation (Kim, Chu & Yang 2025): M teacher forwards per micro-batch, each drawing every "
        "token's experts anew (with probability augment_sampling_prob sampled from the router's "
        "distribution, else its top augment_experts); KD is taken against their combination (fkl: the "
        "mixture of the M distributions, rkl: their normalised geometric mean -- the gradient of the mean "
        "of M KD terms). 0: off; the paper uses 2. MoE teachers only; fkl or rkl only.",
        min=0,
        max=64,
    )
    augment_sampling_prob: float = _f(
        0.05,
        "KA: per token and MoE layer, the probability of sampling the experts instead of top-k (the paper's lambda).",
        min=0,
        max=1,
    )
    augment_experts: int | None = _f(
        None, "KA: experts per token (None: all but one, as in the paper).", min=1
    )
    student_aware_router: bool = _f(
        False,
        "Student-Aware Router (Kim et al. 2025): the teacher uses all its experts, and a copy of its router "
        "weights is trained each step on KL(teacher || student) + router_balance_coef * CV(P)^2 (paper Eq. 9) "
        "with every other teacher weight frozen; kept in checkpoints (sar_router.safetensors), never "
        "exported. MoE teachers only.",
    )
    router_lr: float = _f(1e-5, "SAR: learning rate of the router's own AdamW (paper: 1e-5), constant.", gt=0)
    router_weight_decay: float = _f(
        0.0, "SAR: AdamW weight decay of the router (0: decay would pull towards uniform gates).", min=0
    )
    router_max_grad_norm: float | None = _f(
        1.0, "SAR: clip the router's gradient norm to this (None: no clipping).", gt=0
    )
    router_balance_coef: float = _f(
        0.01,
        "SAR: beta of the paper's balance term CV(P)^2 (P = mean gate probability per expert over a "
        "micro-batch's tokens, summed over layers). Computed per micro-batch: the one SAR term that "
        "depends on how a step is split.",
        min=0,
    )
    router_anchor_coef: float = _f(
        0.0,
        "SAR: weight of KL(original gates || learned gates), mean over tokens and layers (0: off).",
        min=0,
    )
    router_max_logit_shift: float | None = _f(
        1.0,
        "SAR: the learned router is the original plus a logit offset bounded by rho*tanh(./rho) with this "
        "rho, so every expert keeps at least exp(-2*rho) of its original gate probability on every token "
        "(no collapse; KL(original || learned) <= 2*rho per token). None: unbounded (the paper's router).",
        gt=0,
    )


@dataclass
class TokenRouterConfig:
    enabled: bool = _f(
        False,
        "Weight the KD term per token from the knowledge gap, the student's confidence and loss trend, and "
        "the teacher's expert routing (README: the student-aware token router). Off: uniform weights, "
        "exactly today's KD.",
    )
    gap: float = _f(
        1.0,
        "Coefficient of the knowledge gap: the detached per-token KD divergence (standardised log).",
        min=0,
    )
    confidence: float = _f(
        0.5, "Coefficient of the student's uncertainty: its per-token entropy (standardised); 0: off.", min=0
    )
    trend: float = _f(
        0.5,
        "Coefficient of the loss trend: per target token, log(slow / fast running mean of its gap) -- "
        "positive while the student is closing the gap (capacity left), negative when it stalls.",
        min=0,
    )
    expert: float = _f(
        1.0,
        "Coefficient of expert importance: the token's teacher routing probabilities times the log of each "
        "expert's running mean gap relative to its layer's mean (MoE teachers; 0 for dense ones).",
        min=0,
    )
    min_weight: float = _f(0.25, "Lower bound of a token's weight.", gt=0, max=1)
    max_weight: float = _f(4.0, "Upper bound of a token's weight.", min=1)
    sharpen_start: float = _f(
        0.0, "Share of training at which the weights start to move away from uniform.", min=0, max=1
    )
    sharpen_end: float = _f(
        0.5,
        "Share of training at which the weights reach full strength (linear ramp from sharpen_start).",
        min=0,
        max=1,
    )
    stats_decay: float = _f(
        0.95,
        "Per-step decay of the running per-expert gap and the slow per-token trend mean (the fast one forgets "
        "4x faster).",
        gt=0,
        lt=1,
    )


@dataclass
class CurriculumConfig:
    phases: bool = _f(
        False,
        "Progressive loss phases (the seed's use_curriculum): KD + CE only, then the feature and attention "
        "terms ramp in from structure_start, then the contrastive term from all_start.",
    )
    structure_start: float = _f(
        0.3, "Share of training at which the feature and attention terms start to ramp in.", min=0, max=1
    )
    all_start: float = _f(
        0.6, "Share of training at which the contrastive term starts to ramp in.", min=0, max=1
    )
    ramp: float = _f(
        0.3,
        "Share of training over which a term ramps from 0 to its configured weight (0: a step).",
        min=0,
        max=1,
    )
    balance: bool = _f(
        False,
        "Magnitude-aware balancing: each term c (kd, ce, feature, attention, contrastive) is scaled by "
        "m / a_c, a_c the running mean of its per-token magnitude and m the weighted mean of all a_c; each "
        "term then contributes in proportion to its configured weight, and the total keeps its magnitude.",
    )
    balance_decay: float = _f(0.9, "Per-step decay of the running magnitudes of balancing.", gt=0, lt=1)
