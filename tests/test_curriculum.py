"""The curriculum: temperature, loss phases and router sharpening at start / middle / end, phase ramps, the
balancer's rule (relative weights keep their meaning, the total keeps its magnitude), its state, and the
objective under multipliers against the blend written out by hand."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from sakd.config import CurriculumConfig, LossConfig, TokenRouterConfig
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


@pytest.mark.integration
@pytest.mark.parametrize("cross", [False, True])
def test_multipliers_scale_kd_and_ce_apart(make_distiller, tiny_run_config, cross, tmp_path):
    """loss(multipliers) = m_kd*alpha*T^2*KD + m_ce*(1-alpha)*CE where KD applies and m_ce*CE elsewhere --
    checked against the component sums the same call returns, on one and on two tokenizers."""
    raw = copy.deepcopy(tiny_run_config)
    if cross:
        from sakd.commands.demo import train_tokenizer

        teacher_tok = train_tokenizer(Path(raw["data"]["train"]), tmp_path / "t", 300)
        raw["model"]["teacher_tokenizer"] = str(teacher_tok)
    d = make_distiller(raw)
    mb = d._micro_batches()[0]
    teacher = d.teacher_signal(mb)
    mult = {"kd": 2.5, "ce": 0.4}
    with torch.no_grad():
        student = detached_student(d.student, mb)
        base = d.objective(student, teacher, mb["labels"], temperature=2.0, batch=mb)
        scaled = d.objective(student, teacher, mb["labels"], temperature=2.0, batch=mb, multipliers=mult)
    alpha = d.cfg.distillation.loss.alpha
    sums = base.component_sums
    if cross:  # CE alone at the rows without an anchor: split CE by rows from the plain blend
        ce_rest = sums["loss"] - alpha * sums["kd"] - (1 - alpha) * sums["ce"]  # = alpha * CE at those rows
        expected = 2.5 * alpha * sums["kd"] + 0.4 * ((1 - alpha) * sums["ce"] + ce_rest)
    else:
        expected = 2.5 * alpha * sums["kd"] + 0.4 * (1 - alpha) * sums["ce"]
    torch.testing.assert_close(scaled.loss_sum.double(), expected.double(), rtol=1e-5, atol=1e-5)
    assert torch.equal(scaled.component_sums["kd"], sums["kd"]) and torch.equal(
        scaled.component_sums["ce"], sums["ce"]
    )
