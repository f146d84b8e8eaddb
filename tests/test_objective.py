"""The trainer's objective against plain full-logits references (fused and unfused paths)."""

import pytest
import torch
import torch.nn.functional as F

from sakd.config import LossConfig
from sakd.evaluation.heldout import safe_perplexity
from sakd.models.forward import HiddenAndHead
from sakd.objective.composite import Objective
from sakd.objective.curriculum import temperature_at


def _inputs(seed=0, B=3, L=9, Hs=6, Ht=10, V=23):
    g = torch.Generator().manual_seed(seed)
    s = HiddenAndHead(
        torch.randn(B, L, Hs, generator=g, dtype=torch.float64).requires_grad_(),
        torch.randn(V, Hs, generator=g, dtype=torch.float64).requires_grad_(),
        None,
    )
    t = HiddenAndHead(
        torch.randn(B, L, Ht, generator=g, dtype=torch.float64),
        torch.randn(V, Ht, generator=g, dtype=torch.float64),
        None,
    )
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, :4] = -100
    return s, t, labels


def _reference(s, t, labels, alpha, T):
    logits = (s.hidden[:, :-1] @ s.head_weight.T).reshape(-1, s.head_weight.shape[0])
    t_logits = (t.hidden[:, :-1] @ t.head_weight.T).reshape(-1, t.head_weight.shape[0])
    targets = labels[:, 1:].reshape(-1)
    valid = targets != -100
    ce = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    kl = F.kl_div(
        F.log_softmax(logits / T, -1), F.log_softmax(t_logits / T, -1), log_target=True, reduction="none"
    ).sum(-1)
    return alpha * T * T * (kl * valid).sum() + (1 - alpha) * ce


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_objective_matches_reference(fused, alpha):
    s, t, labels = _inputs()
    obj = Objective(LossConfig(alpha=alpha, temperature=2.0, fused=fused, chunk_size=5), vocab_size=23)
    out = obj(s, t if alpha > 0 else None, labels, temperature=2.0)
    ref = _reference(s, t, labels, alpha, 2.0)
    torch.testing.assert_close(out.loss_sum.double(), ref, rtol=1e-6, atol=1e-8)
    assert out.num_tokens == int((labels[:, 1:] != -100).sum())
    g = torch.autograd.grad(out.loss_sum, [s.hidden, s.head_weight])
    g_ref = torch.autograd.grad(ref, [s.hidden, s.head_weight])
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-7)


def test_temperature_schedule():
    cfg = LossConfig(temperature=3.0, min_temperature=2.0, temperature_schedule="linear")
    assert [temperature_at(cfg, s, 5) for s in range(5)] == [3.0, 2.75, 2.5, 2.25, 2.0]
    cos = LossConfig(temperature=3.0, min_temperature=2.0, temperature_schedule="cosine")
    assert temperature_at(cos, 0, 5) == 3.0 and temperature_at(cos, 4, 5) == 2.0
    assert temperature_at(cos, 1, 5) > 2.75  # cosine starts slower than linear
    assert temperature_at(LossConfig(temperature=2.0), 3, 5) == 2.0


def test_safe_perplexity_never_overflows():
    assert safe_perplexity(0.0) == 1.0
    assert safe_perplexity(1e6) < float("inf")
    assert safe_perplexity(float("nan")) < float("inf")


def test_unfused_path_honours_the_sparse_mode():
    """``fused=false`` with a sparse mode computes that sparse KD (it used to fall back to full KD)."""
    s, t, labels = _inputs()
    kw = {"alpha": 0.5, "temperature": 2.0, "chunk_size": 5, "sparse": "topk_tail", "kd_top_k": 3}
    fused = Objective(LossConfig(fused=True, **kw), vocab_size=23)(s, t, labels, temperature=2.0)
    unfused = Objective(LossConfig(fused=False, **kw), vocab_size=23)(s, t, labels, temperature=2.0)
    dense = Objective(LossConfig(fused=False, **{**kw, "sparse": "none"}), vocab_size=23)(
        s, t, labels, temperature=2.0
    )
    torch.testing.assert_close(unfused.loss_sum, fused.loss_sum, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(unfused.component_sums["kd"], dense.component_sums["kd"])
