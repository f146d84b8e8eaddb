"""The curriculum: temperature, loss phases and router sharpening at start / middle / end, phase ramps, the
balancer's rule (relative weights keep their meaning, the total keeps its magnitude), its state, and the
objective under multipliers against the blend written out by hand."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from sakd.config import CurriculumConfig, LossConfig, TokenRouterConfig
from sakd.losses import Head, HeadInput, KDSpec, ObjectiveSpec, Targets, fused_distill
from sakd.objective.curriculum import (
    Balancer,
    Curriculum,
    phase_multipliers,
    ramp,
    sharpness_at,
    temperature_at,
)
from sakd.training.student_aware import detached_student


def test_schedules_at_start_middle_and_end():
    loss = LossConfig(temperature=3.0, min_temperature=1.0, temperature_schedule="linear")
    cur = CurriculumConfig(phases=True, structure_start=0.3, all_start=0.6, ramp=0.3)
    router = TokenRouterConfig(enabled=True, sharpen_start=0.0, sharpen_end=0.5)
    total = 11  # progress = step / 10
    assert [temperature_at(loss, s, total) for s in (0, 5, 10)] == [3.0, 2.0, 1.0]
    assert [sharpness_at(router, s, total) for s in (0, 5, 10)] == [0.0, 1.0, 1.0]
    start, middle, end = (phase_multipliers(cur, s, total) for s in (0, 5, 10))
    assert start == {"kd": 1.0, "ce": 1.0, "feature": 0.0, "attention": 0.0, "contrastive": 0.0}
    assert middle["feature"] == pytest.approx(2 / 3) and middle["contrastive"] == 0.0
    assert end == {"kd": 1.0, "ce": 1.0, "feature": 1.0, "attention": 1.0, "contrastive": 1.0}


def test_phase_ramps():
    assert [ramp(f, 0.3, 0.2) for f in (0.0, 0.29, 0.3, 0.4, 0.5, 0.9)] == pytest.approx([0, 0, 0, 0.5, 1, 1])
    assert [ramp(f, 0.3, 0.0) for f in (0.29, 0.3)] == [0.0, 1.0]  # no ramp: a step


def test_balancer_keeps_relative_weights_and_the_total():
    """Contributions w_c * s_c * a_c come out proportional to w_c, and sum to sum_c w_c * a_c."""
    weights = {"kd": 0.5, "ce": 0.5, "feature": 0.1}
    magnitudes = {"kd": 40.0, "ce": 2.0, "feature": 0.5}
    balancer = Balancer(decay=0.9, magnitudes=dict(magnitudes))
    scales = balancer.scales(weights)
    contributions = {c: weights[c] * scales[c] * magnitudes[c] for c in weights}
    ratio = {c: contributions[c] / weights[c] for c in weights}
    assert max(ratio.values()) == pytest.approx(min(ratio.values()))
    assert sum(contributions.values()) == pytest.approx(sum(weights[c] * magnitudes[c] for c in weights))
    extreme = Balancer(decay=0.9, magnitudes={"kd": 1e4, "ce": 1e-4}).scales({"kd": 0.5, "ce": 0.5})
    assert extreme == {"kd": pytest.approx(0.5), "ce": 100.0}  # scales are clamped to [0.01, 100]


def test_balancer_running_means_and_unseen_components():
    balancer = Balancer(decay=0.5)
    assert balancer.scales({"kd": 1.0, "ce": 1.0}) == {"kd": 1.0, "ce": 1.0}
    balancer.update({"kd": 4.0, "ce": float("nan")})
    balancer.update({"kd": 2.0, "ce": 1.0})
    assert balancer.magnitudes == {"kd": 3.0, "ce": 1.0}


def test_curriculum_state_round_trips_and_is_inert_when_off():
    weights = {"kd": 0.5, "ce": 0.5, "feature": 0.2}
    off = Curriculum(LossConfig(), CurriculumConfig(), TokenRouterConfig(), weights)
    assert not off.active and off.at(3, 10).multipliers == {}
    on = Curriculum(LossConfig(), CurriculumConfig(balance=True), TokenRouterConfig(), weights)
    on.update({"kd": 0.3, "ce": 3.0, "feature": 0.01, "loss": 9.0})
    again = Curriculum(LossConfig(), CurriculumConfig(balance=True), TokenRouterConfig(), weights)
    again.load_state_dict(on.state_dict())
    assert again.at(3, 10) == on.at(3, 10) and set(on.state_dict()) == {"kd", "ce", "feature"}


@pytest.mark.parametrize("grad", [True, False])
def test_ce_weight_without_kd_weighs_the_loss_not_the_reported_ce(grad):
    """alpha*T^2*KL + (1-alpha)*CE where KD applies, r*CE elsewhere, from full logits; the returned ce is the
    plain CE sum whatever r is (closed-form path with gradients, autograd-free path without)."""
    torch.manual_seed(0)
    n, h, v, alpha, temperature, r = 15, 6, 11, 0.3, 2.0, 0.37
    s_hidden = torch.randn(n, h, dtype=torch.float64, requires_grad=grad)
    s_head, t_hidden, t_head = (torch.randn(*s, dtype=torch.float64) for s in ((v, h), (n, h), (v, h)))
    labels = torch.randint(0, v, (n,))
    labels[3] = -100
    kd_mask = torch.rand(n) > 0.4
    spec = ObjectiveSpec(
        kd=KDSpec("fkl", temperature=temperature), alpha=alpha, chunk_size=4, reduction="sum"
    )
    out = fused_distill(
        HeadInput(s_hidden, Head(s_head)),
        HeadInput(t_hidden, Head(t_head)),
        spec,
        Targets(labels=labels, kd_mask=kd_mask, ce_weight_without_kd=r),
    )
    logits = s_hidden @ s_head.T
    log_q = F.log_softmax(logits / temperature, -1)
    log_p = F.log_softmax(t_hidden @ t_head.T / temperature, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    ce = F.cross_entropy(logits, labels, reduction="none", ignore_index=-100)
    valid = labels != -100
    kl = torch.where(kd_mask & valid, kl, 0.0)
    ref = alpha * temperature**2 * kl.sum() + (torch.where(kd_mask, 1 - alpha, r) * ce).sum()
    torch.testing.assert_close(out.loss, ref)
    torch.testing.assert_close(out.ce, ce.sum())
    if grad:
        torch.testing.assert_close(
            torch.autograd.grad(out.loss, s_hidden)[0], torch.autograd.grad(ref, s_hidden)[0]
        )


@pytest.fixture(scope="module")
def unanchoring_tokenizer_dir(corpus, tmp_path_factory):
    """A teacher tokenizer with twice the student's vocabulary (768 vs 384) on the same corpus: it merges
    what the student splits, so many student positions end inside a teacher token and have no anchor."""
    from sakd.commands.demo import train_tokenizer

    return train_tokenizer(corpus, tmp_path_factory.mktemp("ttok768") / "teacher_tok", 768)


def _independent_ce_sum(d, mb) -> torch.Tensor:
    """The student's summed next-token CE over the batch's targets, from its full logits (no sakd loss)."""
    logits = d.hf_student(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
    vocab = d.objective.vocab_size
    return torch.nn.functional.cross_entropy(
        logits[:, :-1, :vocab].reshape(-1, vocab).double(),
        mb["labels"][:, 1:].reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )


@pytest.mark.integration
@pytest.mark.parametrize("cross", [False, True])
def test_multipliers_scale_kd_and_ce_apart(
    make_distiller, tiny_run_config, cross, unanchoring_tokenizer_dir, tmp_path
):
    """loss(multipliers) = m_kd*alpha*T^2*KD + m_ce*(1-alpha)*CE where KD applies and m_ce*CE elsewhere --
    checked against the component sums the same call returns, on one and on two tokenizers (a pair that
    leaves rows without an anchor); the reported ce is the student's plain CE whatever the multipliers."""
    raw = copy.deepcopy(tiny_run_config)
    if cross:
        raw["model"]["teacher_tokenizer"] = str(unanchoring_tokenizer_dir)
    d = make_distiller(raw)
    mb = d._micro_batches()[0]
    if cross:
        predicted = mb["labels"][:, 1:] != -100
        unanchored = int((predicted & (mb["anchor"][:, :-1] < 0)).sum())
        assert 0.1 * int(predicted.sum()) < unanchored < int(predicted.sum())
    teacher = d.teacher_signal(mb)
    alpha = d.cfg.distillation.loss.alpha
    with torch.no_grad():
        student = detached_student(d.student, mb)
        base = d.objective(student, teacher, mb["labels"], temperature=2.0, batch=mb)
        ce = _independent_ce_sum(d, mb)
        sums = base.component_sums
        if cross:  # CE alone at the rows without an anchor: split CE by rows from the plain blend
            ce_rest = sums["loss"] - alpha * sums["kd"] - (1 - alpha) * sums["ce"]  # = alpha * CE there
            assert float(ce_rest) > 0.05 * float(sums["loss"])
        else:
            ce_rest = torch.zeros(())
        for mult in ({"kd": 2.5, "ce": 0.4}, {"kd": 0.3, "ce": 3.0}):
            scaled = d.objective(student, teacher, mb["labels"], temperature=2.0, batch=mb, multipliers=mult)
            expected = mult["kd"] * alpha * sums["kd"] + mult["ce"] * ((1 - alpha) * sums["ce"] + ce_rest)
            torch.testing.assert_close(scaled.loss_sum.double(), expected.double(), rtol=1e-5, atol=1e-5)
            assert torch.equal(scaled.component_sums["kd"], sums["kd"])
            torch.testing.assert_close(scaled.component_sums["ce"].double(), ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sums["ce"].double(), ce, rtol=1e-5, atol=1e-5)


@pytest.mark.integration
def test_balancer_reads_the_plain_ce_across_tokenizers(
    make_distiller, tiny_run_config, unanchoring_tokenizer_dir
):
    """With balancing on and rows without an anchor, every step's logged ce -- the magnitude the balancer
    learns -- is the token-mean CE of the student (before the step's update) on the step's batches, computed
    apart from sakd's loss, also on steps whose ce multiplier is not 1 (no feedback of the multiplier)."""
    raw = copy.deepcopy(tiny_run_config)
    raw["model"]["teacher_tokenizer"] = str(unanchoring_tokenizer_dir)
    raw["distillation"]["curriculum"] = {"balance": True, "balance_decay": 0.5}
    d = make_distiller(raw, max_steps=3, gradient_accumulation_steps=2, batch_size=2)
    running = None
    for _ in range(3):
        mbs = d._micro_batches()
        with torch.no_grad():
            ce = float(sum(_independent_ce_sum(d, mb) for mb in mbs))
            ce /= sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in mbs)
        metrics = d.train_step(mbs)
        assert abs(metrics["ce"] - ce) < 1e-5 * ce
        running = ce if running is None else 0.5 * running + 0.5 * ce
        assert abs(d.aware.curriculum.balancer.magnitudes["ce"] - running) < 1e-5 * ce
    assert abs(metrics["mult_ce"] - 1.0) > 0.01  # the last step ran with a balancing multiplier on ce


def test_balancer_running_magnitude_of_a_signed_unbiased_estimate_is_unbiased():
    """``sampled`` KD's step mean is an unbiased, signed estimate of a KL near 0: the running magnitude of
    step means 0.01 ± 0.05 settles near 0.01 (the skipped negative means made it ~E[x | x > 0] ≈ 0.045)."""
    g = torch.Generator().manual_seed(0)
    balancer = Balancer(decay=0.99)
    for x in (0.01 + 0.05 * torch.randn(4000, generator=g, dtype=torch.float64)).tolist():
        balancer.update({"kd": x, "ce": 2.0})
    assert abs(balancer.magnitudes["kd"] - 0.01) < 0.01
    balancer.magnitudes["kd"] = -0.001  # counts 0 in m = (0 + 2) / 2 and scales by the clamp, its limit at 0+
    assert balancer.scales({"kd": 0.5, "ce": 0.5}) == {"kd": 100.0, "ce": 0.5}
    balancer.update({"kd": 0.0})  # a component absent from the step is skipped
    assert balancer.magnitudes["kd"] == -0.001


@pytest.mark.parametrize("decay", [0.9, 0.99])
def test_balancer_scale_of_a_signed_estimate_near_0_moves_smoothly(decay):
    """A running magnitude wandering across 0 (step means 0.003 ± 0.05, review of the signed balancer): the
    KD scale moves step to step by less than 3x; before the floor it jumped between 1 and the clamp of 100
    (442 / 80 such jumps over these 3,000 steps at decay 0.9 / 0.99)."""
    g = torch.Generator().manual_seed(0)
    balancer, scales = Balancer(decay=decay), []
    for x in (0.003 + 0.05 * torch.randn(3000, generator=g, dtype=torch.float64)).tolist():
        balancer.update({"kd": x, "ce": 2.0})
        scales.append(balancer.scales({"kd": 0.5, "ce": 0.5})["kd"])
    assert min(scales) > 1.0
    assert max(max(a / b, b / a) for a, b in zip(scales, scales[1:], strict=False)) < 3.0
