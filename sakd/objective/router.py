"""The student-aware token router: a weight per token for the KD term, from signals that exist.

For every position where KD applies (a valid target, and across tokenizers an anchor) the router reads

* the **knowledge gap** ``g``: the per-token KD divergence between teacher and student, detached (from a
  stored ``sampled`` signal, whose per-token estimate is signed, the never-negative KL of teacher and student
  coarsened to the drawn ids and the rest: :func:`sakd.losses.sparse_projection.sampled_gap`);
* the student's **uncertainty**: its next-token entropy ``H / log V``;
* the **loss trend** of the target token ``v``: ``log(slow_v / fast_v)``, two running means of the gap at
  that vocabulary entry -- positive while the student is closing the gap there (it has capacity left),
  negative when the gap stalls or grows;
* **expert importance** (MoE teachers): with the teacher's routing probabilities ``p_l(e)`` of the token
  at every MoE layer and ``G_le`` the running mean gap of the tokens routed to expert ``e`` (weighted by
  ``p``), ``sum_e p_l(e) (log G_le - mean_e log G_le)`` averaged over layers: tokens the teacher sends
  to experts the student lags on score higher.

The score ``s = gap·z(log g) + confidence·z(H) + trend·clip(trend) + expert·importance`` (``z`` a
standardisation over the optimizer step's tokens, clipped to +-3) becomes ``w = clip(exp(sigma·s + b),
min_weight, max_weight)``: ``sigma`` ramps from 0 (uniform) to 1 over training, and ``b`` is the one number
that makes the mean of ``w`` over the step's KD tokens exactly 1 (found by bisection). The standardisation
and ``b`` are taken over the **whole optimizer step** -- every micro-batch on every rank -- so a token's
weight does not depend on how the step is split; the running statistics are updated after the weights are
computed, from the step's global sums. Weights are detached, deterministic given their inputs, and with the
router off nothing of this runs (the KD term is bitwise today's).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from sakd.align.positions import gather_at_anchors
from sakd.config import TokenRouterConfig
from sakd.losses import KDSpec, SparseTeacher, VocabBridge, kd_per_position, over_chunks, resolve_chunk_size
from sakd.losses.mixture import mixture_logits
from sakd.losses.sparse_projection import one_to_one_as_many, sampled_gap
from sakd.models.capture import RouterSignal
from sakd.objective.kd_rows import KDRows

Reduce = Callable[[Tensor, str], Tensor]
_CLIP, _EPS, _BISECTIONS = 3.0, 1e-8, 60


@dataclass
class TokenSignals:
    """The router's inputs for one micro-batch, one row per student position (``N = B·(Ls-1)``).

    ``valid``: KD applies there; ``gap``: detached per-token KD divergence; ``entropy``: the student's
    entropy over ``log V``; ``targets``: student target ids; ``experts``: per MoE layer ``[N, E]`` teacher
    routing probabilities at those positions (None for a dense teacher or a signal without them)."""

    valid: Tensor
    gap: Tensor
    entropy: Tensor
    targets: Tensor
    experts: list[Tensor] | None = None

    def __post_init__(self) -> None:
        # A divergence is >= 0, but float32 sums of near-identical rows round to values down to about -4e-7
        # (forward KL): one such value made log(gap + eps) NaN and, through the step's standardisation, every
        # weight of the step. Such a value is clamped to 0, the nearest value a divergence can take.
        self.gap = self.gap.clamp_min(0.0)


def token_signals(
    rows: KDRows, spec: KDSpec, router: RouterSignal | None, chunk_size: int | str, ignore_index: int = -100
) -> TokenSignals:
    """The router's inputs for one micro-batch, from the rows the KD term is taken on (no gradients): the
    per-token divergence at the step's temperature (a live teacher's dense one; a stored signal's in its
    sparse mode), the student's entropy, and the teacher's routing probabilities at the same positions (a
    live teacher's ``router``, or those a cache stores with its rows)."""
    student, teacher, bridge = rows.student, rows.teacher, rows.bridge
    stored = isinstance(teacher, SparseTeacher)
    spec = (
        dataclasses.replace(spec, uld_weight=0.0)
        if stored
        else dataclasses.replace(spec, sparse=None, uld_weight=0.0)
    )
    vocab = student.head.vocab or student.head.weight.shape[0]

    def chunk(r: slice) -> Tensor:
        s_logits = student.head.logits(student.hidden[r], upcast=True)
        if stored:
            t_side: Tensor | SparseTeacher = teacher.rows(r)
        else:
            t_side = teacher.head.logits(teacher.hidden[r], upcast=True)  # [c, (M,) V]
            if rows.mixture:
                t_side = mixture_logits(t_side, spec.temperature)
        if isinstance(t_side, SparseTeacher) and spec.sparse == "sampled":  # the signed estimate: no log
            gap = sampled_gap(s_logits, t_side, spec.temperature, _teacher_to_student(bridge, t_side))
        else:
            gap = kd_per_position(
                s_logits,
                t_side,
                spec,
                vocab_map=bridge.vocab_map if bridge.teacher_to_student is None else None,
                teacher_to_student=bridge.teacher_to_student,
                targets=rows.targets[r] if stored and rows.target_logprob is not None else None,
                target_logprob=rows.target_logprob[r] if stored and rows.target_logprob is not None else None,
            )
        logq = torch.log_softmax(s_logits, dim=-1)
        entropy = -(logq.exp() * logq).sum(-1) / math.log(vocab)
        return torch.stack([gap, entropy], -1)

    n = student.hidden.shape[0]
    t_size = (0, 0) if stored else (teacher.head.weight.shape[0], teacher.hidden.shape[-1])
    chunk_rows = resolve_chunk_size(
        chunk_size, n, (student.head.weight.shape[0], t_size[0]), (student.hidden.shape[-1], t_size[1])
    )
    with torch.no_grad():
        both = over_chunks(chunk, n, chunk_rows, combine="cat")
    valid = rows.targets != ignore_index
    if rows.kd_mask is not None:
        valid = valid & rows.kd_mask
    if rows.router is not None:  # a stored signal's [N, layers, experts]
        experts = list(rows.router.float().unbind(1))
    else:
        experts = None if router is None else [_at_positions(p, rows, router) for p in router.probs]
    return TokenSignals(valid, both[:, 0].nan_to_num(0.0), both[:, 1], rows.targets, experts)


def _teacher_to_student(bridge: VocabBridge, teacher: SparseTeacher) -> Tensor | None:
    """The many-to-one map a stored signal of another vocabulary is projected with (as kd_per_position)."""
    if bridge.teacher_to_student is not None or bridge.vocab_map is None:
        return bridge.teacher_to_student
    vt = max(int(bridge.vocab_map.max()), int(teacher.indices.max())) + 1
    return one_to_one_as_many(bridge.vocab_map, vt)


def _at_positions(probs: Tensor, rows: KDRows, router: RouterSignal) -> Tensor:
    """``[N, E]``: a layer's routing probabilities ``[B·Lt, E]`` at the KD rows' teacher positions."""
    batch, length = router.batch_shape
    per_token = probs.reshape(batch, length, -1)
    at = gather_at_anchors(per_token, rows.anchor) if rows.anchor is not None else per_token[:, :-1]
    return at.reshape(-1, per_token.shape[-1])


def _standardise(values: list[Tensor], valid: list[Tensor], reduce: Reduce) -> list[Tensor]:
    """``(x - mean) / std`` over the valid rows of the whole step (all micro-batches, all ranks), clipped."""
    dev = values[0].device
    sums = torch.zeros(3, dtype=torch.float64, device=dev)
    for x, m in zip(values, valid, strict=True):
        v = x[m].double()
        sums += torch.stack([v.new_tensor(float(v.numel())), v.sum(), (v * v).sum()])
    n, s, ss = reduce(sums, "sum").tolist()
    mean = s / max(n, 1.0)
    std = math.sqrt(max(ss / max(n, 1.0) - mean * mean, 0.0))
    return [((x.double() - mean) / max(std, 1e-6)).clamp(-_CLIP, _CLIP) for x in values]


def _bisect_offset(scores: list[Tensor], valid: list[Tensor], lo: float, hi: float, reduce: Reduce) -> float:
    """``b`` with ``mean(clip(exp(score + b), lo, hi)) == 1`` over the step's valid rows (monotone in ``b``)."""
    dev = scores[0].device
    ext = torch.tensor([-math.inf, -math.inf, 0.0], dtype=torch.float64, device=dev)
    for x, m in zip(scores, valid, strict=True):
        if bool(m.any()):
            ext = torch.maximum(ext, torch.stack([x[m].max(), -x[m].min(), ext.new_zeros(())]))
    top, neg_bottom, _ = reduce(ext, "max").tolist()
    local = torch.tensor(float(sum(int(m.sum()) for m in valid)), dtype=torch.float64, device=dev)
    count = float(reduce(local, "sum"))
    if count == 0:  # no KD token anywhere in the step: nothing to weigh
        return 0.0
    low, high = math.log(lo) - top, math.log(hi) + neg_bottom
    for _ in range(_BISECTIONS):
        mid = 0.5 * (low + high)
        total = sum((torch.exp(x[m] + mid).clamp(lo, hi)).sum() for x, m in zip(scores, valid, strict=True))
        mean = (
            float(reduce(torch.as_tensor(total, dtype=torch.float64, device=dev).reshape(()), "sum")) / count
        )
        low, high = (mid, high) if mean < 1.0 else (low, mid)
    return 0.5 * (low + high)


class TokenRouter:
    """Per-token KD weights and the running statistics behind them (saved in checkpoints)."""

    def __init__(self, cfg: TokenRouterConfig, vocab_size: int) -> None:
        self.cfg = cfg
        self.slow = torch.zeros(vocab_size, dtype=torch.float64)  # running mean gap per target token
        self.fast = torch.zeros(vocab_size, dtype=torch.float64)
        self.seen = torch.zeros(vocab_size, dtype=torch.bool)
        self.expert_gap: Tensor | None = None  # [layers, experts] running routing-weighted mean gap

    @property
    def fast_decay(self) -> float:
        return max(0.0, 1.0 - 4.0 * (1.0 - self.cfg.stats_decay))

    def importance(self, experts: list[Tensor]) -> Tensor:
        """``[N]``: the mean over layers of ``sum_e p_l(e) (log G_le - mean_e log G_le)`` (0 before any
        statistics exist)."""
        if self.expert_gap is None or len(experts) != self.expert_gap.shape[0]:
            return torch.zeros(experts[0].shape[0], dtype=torch.float64, device=experts[0].device)
        log_g = self.expert_gap.clamp_min(_EPS).log()
        rel = (log_g - log_g.mean(-1, keepdim=True)).to(experts[0].device)
        return torch.stack([p.double() @ rel[i] for i, p in enumerate(experts)]).mean(0)

    def trend(self, targets: Tensor) -> Tensor:
        """``[N]``: ``log(slow / fast)`` of each target token's running gap, clipped to +-1 (0 if unseen)."""
        t = targets.clamp_min(0).cpu()
        value = (self.slow[t].clamp_min(_EPS) / self.fast[t].clamp_min(_EPS)).log().clamp(-1.0, 1.0)
        return torch.where(self.seen[t] & (targets.cpu() >= 0), value, 0.0).to(targets.device)

    def weights(self, signals: list[TokenSignals], sharpness: float, reduce: Reduce) -> list[Tensor]:
        """One ``[N]`` float32 weight tensor per micro-batch (0 where KD does not apply), mean 1 over the
        step's KD tokens, within ``[min_weight, max_weight]``; all ones at ``sharpness`` 0."""
        cfg, valid = self.cfg, [s.valid for s in signals]
        if sharpness == 0.0:
            return [s.valid.float() for s in signals]
        z_gap = _standardise([(s.gap.double() + _EPS).log() for s in signals], valid, reduce)
        z_ent = _standardise([s.entropy.double() for s in signals], valid, reduce)
        scores = []
        for s, zg, ze in zip(signals, z_gap, z_ent, strict=True):
            score = cfg.gap * zg + cfg.confidence * ze + cfg.trend * self.trend(s.targets)
            if s.experts is not None and cfg.expert > 0:
                score = score + cfg.expert * self.importance(s.experts).clamp(-_CLIP, _CLIP)
            scores.append(sharpness * score)
        b = _bisect_offset(scores, valid, cfg.min_weight, cfg.max_weight, reduce)
        return [
            torch.where(m, torch.exp(x + b).clamp(cfg.min_weight, cfg.max_weight), 0.0).float()
            for x, m in zip(scores, valid, strict=True)
        ]

    def update(self, signals: list[TokenSignals], reduce: Reduce) -> None:
        """Fold the step's gaps (global sums over micro-batches and ranks) into the running statistics."""
        dev, vocab = signals[0].gap.device, self.slow.shape[0]
        sums = torch.zeros(2, vocab, dtype=torch.float64, device=dev)
        for s in signals:
            t = s.targets[s.valid].long()
            sums[0].index_add_(0, t, s.gap[s.valid].double())
            sums[1].index_add_(0, t, torch.ones_like(t, dtype=torch.float64))
        sums = reduce(sums, "sum").cpu()
        hit = sums[1] > 0
        mean = sums[0][hit] / sums[1][hit]
        for stat, decay in ((self.slow, self.cfg.stats_decay), (self.fast, self.fast_decay)):
            stat[hit] = torch.where(self.seen[hit], decay * stat[hit] + (1 - decay) * mean, mean)
        self.seen |= hit
        if signals[0].experts is None:
            return
        num = sum(
            torch.stack([p.double().T @ torch.where(s.valid, s.gap, 0.0).double() for p in s.experts])
            for s in signals
        )
        den = sum(torch.stack([(p.double() * s.valid[:, None]).sum(0) for p in s.experts]) for s in signals)
        num, den = reduce(torch.stack([num, den]), "sum").cpu()
        step_gap = num / den.clamp_min(_EPS)
        if self.expert_gap is None:
            self.expert_gap = step_gap
        else:
            d = self.cfg.stats_decay
            self.expert_gap = torch.where(den > 0, d * self.expert_gap + (1 - d) * step_gap, self.expert_gap)

    def state_dict(self) -> dict[str, Tensor]:
        state = {"slow": self.slow, "fast": self.fast, "seen": self.seen}
        if self.expert_gap is not None:
            state["expert_gap"] = self.expert_gap
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.slow, self.fast, self.seen = state["slow"].double(), state["fast"].double(), state["seen"].bool()
        self.expert_gap = state["expert_gap"].double() if "expert_gap" in state else None


def weight_stats(weights: list[Tensor], signals: list[TokenSignals], reduce: Reduce) -> dict[str, object]:
    """metrics.jsonl statistics of one step's weights (global): mean, min, max, the entropy of the
    normalised weights over ``log n`` (1 = uniform), and per teacher layer and expert the mean weight of the
    tokens routed there (routing-probability weighted; 1 = no preference)."""
    dev = weights[0].device
    w_valid = [w[s.valid].double() for w, s in zip(weights, signals, strict=True)]
    flat = torch.cat(w_valid) if w_valid else torch.zeros(0, dtype=torch.float64, device=dev)
    sums = reduce(
        torch.stack(
            [flat.new_tensor(float(flat.numel())), flat.sum(), (flat * flat.clamp_min(_EPS).log()).sum()]
        ),
        "sum",
    )
    n, total, wlogw = sums.tolist()
    big = torch.stack([flat.max(), -flat.min()]) if flat.numel() else torch.full((2,), -math.inf, device=dev)
    top, neg_low = reduce(big.double(), "max").tolist()
    out: dict[str, object] = {
        "router_w_mean": total / max(n, 1.0),
        "router_w_max": top,
        "router_w_min": -neg_low,
    }
    if n > 1 and total > 0:
        out["router_w_entropy"] = (math.log(total) - wlogw / total) / math.log(n)
    if signals[0].experts is not None:
        num = sum(
            torch.stack([p.double().T @ w.double() for p in s.experts])
            for w, s in zip(weights, signals, strict=True)
        )
        den = sum(torch.stack([(p.double() * s.valid[:, None]).sum(0) for p in s.experts]) for s in signals)
        num, den = reduce(torch.stack([num, den]), "sum").cpu()
        out["router_w_share"] = [[round(x, 5) for x in row] for row in (num / den.clamp_min(_EPS)).tolist()]
    return out
