"""The auxiliary terms are normalised like KD and CE: summed over the predicted positions only (the
trainer divides every term by the same global token count) and averaged over layer pairs."""

from __future__ import annotations

import copy

import torch

from sakd.config import LossConfig
from sakd.models.forward import HiddenAndHead
from sakd.objective.aux_terms import AuxTerms
from sakd.objective.composite import Objective, predicted_positions
from sakd.objective.terms.feature import FeatureTerm


def _outputs(pairs: int, seed: int = 0, B: int = 2, L: int = 7, H: int = 4, V: int = 11):
    g = torch.Generator().manual_seed(seed)
    s_layer = torch.randn(B, L, H, generator=g, dtype=torch.float64)
    t_layer = torch.randn(B, L, H, generator=g, dtype=torch.float64)
    # every pair compares the same two states: an average over pairs does not depend on their number
    student = HiddenAndHead(torch.randn(B, L, H, generator=g), torch.randn(V, H, generator=g), None)
    teacher = HiddenAndHead(torch.randn(B, L, H, generator=g), torch.randn(V, H, generator=g), None)
    student.layers = {i + 1: s_layer for i in range(pairs)}
    teacher.layers = {i + 1: t_layer for i in range(pairs)}
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, 3] = -100  # position 2 of sequence 0 predicts nothing
    return student, teacher, labels, s_layer, t_layer


def _terms(pairs: int) -> AuxTerms:
    term = FeatureTerm([(i + 1, i + 1) for i in range(pairs)], 4, 4, "mse").double()
    return AuxTerms({"feature": term}, {"feature": 1.0})


def test_feature_term_sums_predicted_positions_and_averages_layer_pairs():
    for pairs in (1, 4):
        student, teacher, labels, s_layer, t_layer = _outputs(pairs)
        terms = _terms(pairs)  # identity projections (equal hidden sizes)
        predicted = predicted_positions(labels)
        zero = torch.zeros((), dtype=torch.float64)
        _, sums = terms.add_to(student, teacher, {}, predicted, zero, {})
        per_row = (s_layer - t_layer).pow(2).mean(-1)  # mse per position
        expected = per_row[predicted].sum()
        torch.testing.assert_close(sums["feature"], expected)
        assert int(predicted.sum()) == labels.shape[0] * (labels.shape[1] - 1) - 1  # not the last position


def test_objective_counts_the_same_tokens_for_every_term():
    student, teacher, labels, *_ = _outputs(2)
    student.hidden.requires_grad_(True)
    obj = Objective(LossConfig(alpha=0.5, temperature=1.0, chunk_size=4), vocab_size=11, aux=_terms(2))
    out = obj(student, teacher, labels, temperature=1.0)
    assert out.num_tokens == int(predicted_positions(labels).sum())
    assert set(out.component_sums) >= {"loss", "kd", "ce", "feature"}
    total = out.component_sums["kd"] * 0.5 + out.component_sums["ce"] * 0.5 + out.component_sums["feature"]
    torch.testing.assert_close(out.component_sums["loss"].double(), total.double(), rtol=1e-5, atol=1e-6)


def test_alpha_zero_with_an_auxiliary_term_loads_the_teacher(tiny_run_config, make_distiller, tmp_path):
    """alpha=0 turns KD off, not the auxiliary terms: the teacher is loaded for them (it used to be
    skipped, silently training CE only)."""
    raw = copy.deepcopy(tiny_run_config)
    raw["distillation"]["loss"]["alpha"] = 0.0
    raw["distillation"]["feature"] = {"weight": 1.0}
    d = make_distiller(raw, output_dir=str(tmp_path / "run"), max_steps=1)
    assert d.teacher is not None and d.aux_terms is not None
    metrics = d.train_step(d._micro_batches())
    assert metrics["feature"] > 0 and "kd" not in metrics
    assert metrics["loss"] > metrics["ce"]
