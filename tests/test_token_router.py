"""The student-aware token router: per-token KD weights with mean 1, bounds, no gradient, determinism,
uniform when off, the same weights however a step is split, expert statistics with a known answer, and the
KD-only weighting of the fused loss against a plain reference."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from sakd.config import TokenRouterConfig
from sakd.losses import (
    Head,
    HeadInput,
    KDSpec,
    ObjectiveSpec,
    Targets,
    VocabBridge,
    fused_distill,
    kd_per_position,
    sample_teacher,
)
from sakd.objective.composite import KDRows
from sakd.objective.router import TokenRouter, TokenSignals, token_signals, weight_stats


def _identity(tensor: torch.Tensor, op: str) -> torch.Tensor:  # one process: reductions are the identity
    return tensor


def _signals(n: int = 40, seed: int = 0, layers: int = 2, experts: int = 3) -> TokenSignals:
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(n, generator=g) > 0.2
    probs = [torch.softmax(torch.randn(n, experts, generator=g) * 2, -1) for _ in range(layers)]
    return TokenSignals(
        valid=valid,
        gap=torch.rand(n, generator=g).pow(3) * 2,
        entropy=torch.rand(n, generator=g),
        targets=torch.randint(0, 10, (n,), generator=g),
        experts=probs,
    )


def _split(s: TokenSignals, parts: int) -> list[TokenSignals]:
    size = s.valid.shape[0] // parts
    cut = lambda t: [t[i * size : (i + 1) * size] for i in range(parts)]  # noqa: E731
    experts = list(zip(*[cut(p) for p in s.experts], strict=True))
    return [
        TokenSignals(v, g, e, t, list(x))
        for v, g, e, t, x in zip(
            cut(s.valid), cut(s.gap), cut(s.entropy), cut(s.targets), experts, strict=True
        )
    ]


def _router(**cfg) -> TokenRouter:
    router = TokenRouter(TokenRouterConfig(enabled=True, **cfg), vocab_size=10)
    for seed in (5, 6):  # running statistics from two earlier steps
        router.update([_signals(seed=seed)], _identity)
    return router


def test_weights_mean_one_bounded_detached_deterministic():
    router, s = _router(min_weight=0.5, max_weight=2.0), _signals()
    (w,) = router.weights([s], 1.0, _identity)
    valid = w[s.valid]
    assert abs(float(valid.double().mean()) - 1.0) < 1e-6
    assert float(valid.min()) >= 0.5 - 1e-7 and float(valid.max()) <= 2.0 + 1e-7
    assert float(valid.max()) > 1.2 and float(valid.min()) < 0.8  # not uniform
    assert torch.all(w[~s.valid] == 0) and not w.requires_grad and w.dtype == torch.float32
    (again,) = router.weights([s], 1.0, _identity)
    assert torch.equal(w, again)


def test_weights_are_exactly_uniform_at_sharpness_zero_and_sharpen_monotonically():
    router, s = _router(), _signals()
    (flat,) = router.weights([s], 0.0, _identity)
    assert torch.equal(flat, s.valid.float())
    spread = [float(router.weights([s], k, _identity)[0][s.valid].std()) for k in (0.25, 0.5, 1.0)]
    assert spread[0] < spread[1] < spread[2]


@pytest.mark.parametrize("parts", [2, 4])
def test_the_same_weights_however_the_step_is_split(parts):
    router, s = _router(), _signals()
    (whole,) = router.weights([s], 1.0, _identity)
    split = torch.cat(router.weights(_split(s, parts), 1.0, _identity))
    torch.testing.assert_close(split, whole, rtol=0, atol=1e-6)


def test_a_slightly_negative_float32_gap_weighs_as_a_zero_gap():
    """float32 forward KL of near-identical rows rounds to values down to about -4e-7; a divergence is >= 0,
    so such a gap is a gap of 0: the same finite weights and running statistics as with that entry at 0."""
    s = _signals()
    i = int(s.valid.nonzero()[0])
    gaps = {}
    for value in (0.0, -4e-7):
        gap = s.gap.clone()
        gap[i] = value
        gaps[value] = TokenSignals(s.valid, gap, s.entropy, s.targets, s.experts)
    router, twin = _router(), _router()
    (at_zero,) = router.weights([gaps[0.0]], 1.0, _identity)
    (negative,) = twin.weights([gaps[-4e-7]], 1.0, _identity)
    assert torch.isfinite(negative).all() and torch.equal(negative, at_zero)
    router.update([gaps[0.0]], _identity)
    twin.update([gaps[-4e-7]], _identity)
    ours, theirs = router.state_dict(), twin.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_near_identical_student_and_teacher_give_finite_weights():
    """End to end from the rows: a student head 1e-4 away from the teacher's gives per-token float32 KL
    values that round below 0 at about half the positions; the gaps read 0 there and the weights are finite
    with mean 1."""
    g = torch.Generator().manual_seed(0)
    n, h, v = 600, 16, 384
    hidden, head = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g)
    student_head = head + 1e-4 * torch.randn(v, h, generator=g)
    rows = KDRows(
        student=HeadInput(hidden, Head(student_head)),
        teacher=HeadInput(hidden, Head(head)),
        bridge=VocabBridge(),
        targets=torch.randint(0, v, (n,), generator=g),
        kd_mask=None,
        anchor=None,
    )
    spec = KDSpec("fkl", temperature=1.0)
    raw = kd_per_position(hidden @ student_head.T, hidden @ head.T, spec)
    assert float(raw.min()) < 0  # the rounding the router meets
    signals = token_signals(rows, spec, None, chunk_size=128)
    router = TokenRouter(TokenRouterConfig(enabled=True), vocab_size=v)
    (w,) = router.weights([signals], 1.0, _identity)
    assert torch.isfinite(w).all() and abs(float(w.double().mean()) - 1.0) < 1e-6
    assert float(signals.gap.min()) == 0.0


def test_expert_importance_has_the_known_answer():
    """Two experts, tokens routed one-hot: expert 0's tokens have gap 1, expert 1's gap 4. The running mean
    gaps are (1, 4), so a token routed to expert 1 scores log 4 - (log 1 + log 4)/2 = log 2, one routed to
    expert 0 scores -log 2, one split evenly 0."""
    router = TokenRouter(TokenRouterConfig(enabled=True), vocab_size=4)
    onehot = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    s = TokenSignals(
        valid=torch.ones(4, dtype=torch.bool),
        gap=torch.tensor([1.0, 1.0, 4.0, 4.0]),
        entropy=torch.zeros(4),
        targets=torch.arange(4),
        experts=[onehot],
    )
    router.update([s], _identity)
    torch.testing.assert_close(router.expert_gap, torch.tensor([[1.0, 4.0]], dtype=torch.float64))
    probe = [torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])]
    torch.testing.assert_close(
        router.importance(probe), torch.tensor([-math.log(2), math.log(2), 0.0], dtype=torch.float64)
    )
    stats = weight_stats([torch.tensor([0.5, 0.5, 1.5, 1.5])], [s], _identity)
    assert stats["router_w_share"] == [[0.5, 1.5]] and stats["router_w_mean"] == 1.0
    assert stats["router_w_min"] == 0.5 and stats["router_w_max"] == 1.5


def test_trend_is_the_log_ratio_of_the_slow_and_fast_running_gaps():
    """A token whose gap falls from 2 to 1: slow = 0.95*2 + 0.05*1, fast = 0.8*2 + 0.2*1."""
    router = TokenRouter(TokenRouterConfig(enabled=True, stats_decay=0.95), vocab_size=3)
    for gap in (2.0, 1.0):
        router.update(
            [TokenSignals(torch.tensor([True]), torch.tensor([gap]), torch.zeros(1), torch.tensor([1]))],
            _identity,
        )
    expected = math.log((0.95 * 2 + 0.05) / (0.8 * 2 + 0.2))
    torch.testing.assert_close(
        router.trend(torch.tensor([1, 0, -100])), torch.tensor([expected, 0.0, 0.0], dtype=torch.float64)
    )


def test_state_round_trips():
    router = _router()
    fresh = TokenRouter(TokenRouterConfig(enabled=True), vocab_size=10)
    fresh.load_state_dict({k: v.clone() for k, v in router.state_dict().items()})
    s = _signals()
    assert torch.equal(router.weights([s], 1.0, _identity)[0], fresh.weights([s], 1.0, _identity)[0])


@pytest.mark.parametrize("with_mask", [False, True])
def test_fused_loss_weights_only_the_kd_term(with_mask):
    """alpha*T^2*sum_t w_t KL_t + (1-alpha)*CE (CE at full weight where KD has no anchor), from full logits."""
    torch.manual_seed(0)
    n, h, v, alpha, temperature = 14, 6, 11, 0.3, 2.0
    s_hidden = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    s_head, t_hidden, t_head = (torch.randn(*s, dtype=torch.float64) for s in ((v, h), (n, h), (v, h)))
    labels = torch.randint(0, v, (n,))
    w = torch.rand(n, dtype=torch.float64) * 2
    kd_mask = torch.rand(n) > 0.3 if with_mask else None
    spec = ObjectiveSpec(
        kd=KDSpec("fkl", temperature=temperature), alpha=alpha, chunk_size=4, reduction="sum"
    )
    out = fused_distill(
        HeadInput(s_hidden, Head(s_head)),
        HeadInput(t_hidden, Head(t_head)),
        spec,
        Targets(labels=labels, kd_mask=kd_mask, kd_weights=w),
    )
    logits = s_hidden @ s_head.T
    log_q = F.log_softmax(logits / temperature, -1)
    log_p = F.log_softmax(t_hidden @ t_head.T / temperature, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    ce = F.cross_entropy(logits, labels, reduction="none")
    has = torch.ones(n, dtype=torch.bool) if kd_mask is None else kd_mask
    ref = (alpha * temperature**2 * w * kl * has).sum() + (torch.where(has, 1 - alpha, 1.0) * ce).sum()
    torch.testing.assert_close(out.loss, ref)
    torch.testing.assert_close(
        torch.autograd.grad(out.loss, s_hidden)[0], torch.autograd.grad(ref, s_hidden)[0]
    )


@pytest.mark.integration
def test_router_on_at_sharpness_zero_is_bitwise_plain_kd(make_distiller, tiny_run_config):
    """Weights exactly 1 (the sharpening has not started): the same updates as the router off, bit for bit,
    through the router's whole path (cached teacher signals, a no-grad student pass, KD weights)."""
    results = []
    for router in ({}, {"enabled": True, "sharpen_start": 1.0, "sharpen_end": 1.0}):
        raw = copy.deepcopy(tiny_run_config)
        raw["distillation"]["router"] = router
        d = make_distiller(raw, max_steps=4, gradient_accumulation_steps=2, batch_size=2)
        logged = [d.train_step(d._micro_batches()) for _ in range(2)]
        for m in logged:
            assert m.get("router_sharpness", 0.0) == 0.0
        results.append(
            ({k: v.clone() for k, v in d.hf_student.state_dict().items()}, [m["loss"] for m in logged])
        )
    (a, la), (b, lb) = results
    assert la == lb and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.integration
def test_router_weights_are_logged_and_sharpen(make_distiller, tiny_run_config):
    raw = copy.deepcopy(tiny_run_config)
    raw["distillation"]["router"] = {"enabled": True, "sharpen_end": 0.0}
    d = make_distiller(raw, max_steps=3)
    d.train()
    import json

    records = [json.loads(x) for x in (d.run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    last = records[-1]
    assert (
        abs(last["router_w_mean"] - 1.0) < 1e-6
        and 0.25 <= last["router_w_min"] <= last["router_w_max"] <= 4.0
    )
    assert 0 < last["router_w_entropy"] < 1
    share = last["router_w_share"]  # the tiny-moe teacher: 4 layers x 4 experts
    assert len(share) == 4 and all(len(row) == 4 for row in share)


def test_the_router_parts_run_with_the_default_chunk_size(make_distiller, tiny_run_config):
    """distillation.loss.chunk_size: auto (the default) reaches the token router's and the Student-Aware
    Router's own chunk loops resolved to a number (they used to fail comparing "auto" with 1)."""
    raw = copy.deepcopy(tiny_run_config)
    raw["distillation"]["loss"]["chunk_size"] = "auto"
    raw["distillation"]["router"] = {"enabled": True, "sharpen_start": 0.0, "sharpen_end": 0.5}
    raw["distillation"]["moe"] = {"student_aware_router": True}
    d = make_distiller(raw, max_steps=1)
    metrics = d.train_step(d._micro_batches())
    assert (
        math.isfinite(metrics["loss"]) and metrics["router_w_mean"] > 0 and math.isfinite(metrics["sar_kd"])
    )


def _rows(student_hidden, head, teacher, targets) -> KDRows:
    return KDRows(
        student=HeadInput(student_hidden, Head(head)),
        teacher=teacher,
        bridge=VocabBridge(),
        targets=targets,
        kd_mask=None,
        anchor=None,
    )


def test_router_weights_from_a_sampled_cache_track_those_from_the_full_teacher():
    """A stored ``sampled`` signal (128 draws) of a student close to its teacher: the per-position sampled
    estimate is below 0 at 23% of the positions, which the gap's log scale turned into log(1e-8), the
    bottom of the step's z-scores (weights correlated 0.81 with the live teacher's). The router's sampled
    gap is a KL >= 0 of coarsened distributions, at most the full KL: weights correlate 0.999."""
    g = torch.Generator().manual_seed(0)
    n, h, v = 2000, 32, 512
    head = torch.randn(v, h, generator=g)
    teacher_hidden = torch.randn(n, h, generator=g)
    student_hidden = teacher_hidden + torch.randn(n, h, generator=g) * (
        0.04 * torch.randn(n, 1, generator=g).exp()
    )
    targets = torch.randint(0, v, (n,), generator=g)
    stored = sample_teacher(teacher_hidden @ head.T, 128, generator=torch.Generator().manual_seed(1))
    live_spec, stored_spec = KDSpec("fkl"), KDSpec("fkl", sparse="sampled")
    live = token_signals(
        _rows(student_hidden, head, HeadInput(teacher_hidden, Head(head)), targets), live_spec, None, 512
    )
    sampled = token_signals(_rows(student_hidden, head, stored, targets), stored_spec, None, 512)
    signed = kd_per_position(student_hidden @ head.T, stored, stored_spec)
    assert float((signed < 0).float().mean()) > 0.05  # the signed estimates the router meets
    assert (sampled.gap >= 0).all() and (sampled.gap <= live.gap + 1e-6).all()
    cfg = TokenRouterConfig(enabled=True, confidence=0.0, trend=0.0, expert=0.0)
    weights = [TokenRouter(cfg, v).weights([s], 1.0, _identity)[0] for s in (live, sampled)]
    corr = float(torch.corrcoef(torch.stack(weights).double())[0, 1])
    assert corr > 0.95, corr


def test_the_sampled_gap_across_tokenizers_is_never_negative_and_near_zero_at_the_projected_teacher():
    """Many-to-one teacher -> student map, a stored sampled signal: the router's gap is >= 0 everywhere and
    small where the student is the projected teacher (the signed value is not a gap: it can be < 0)."""
    from sakd.losses.sparse_projection import sampled_gap

    g = torch.Generator().manual_seed(0)
    vt, vs, n = 1024, 128, 512
    t2s = torch.randint(0, vs, (vt,), generator=g)
    logits = torch.randn(n, vt, generator=g) * 3.0
    projected = torch.zeros(n, vs).scatter_add_(1, t2s.expand(n, -1), torch.softmax(logits, -1)).log()
    stored = sample_teacher(logits, 128, generator=torch.Generator().manual_seed(1))
    at_teacher = sampled_gap(projected, stored, 1.0, t2s)
    away = sampled_gap(projected + torch.randn(n, vs, generator=g), stored, 1.0, t2s)
    assert (at_teacher >= 0).all() and (away >= 0).all()
    assert float(at_teacher.mean()) < 0.1 * float(away.mean())
