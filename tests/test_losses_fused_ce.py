"""The fused linear cross-entropy (the CE-only objective's training path) against
``torch.nn.functional.cross_entropy`` on the full logits: value and the gradients of hidden, head and bias."""

import pytest
import torch
import torch.nn.functional as F

from sakd.losses import Head, fused_linear_cross_entropy


def _case(seed=0, N=23, H=5, V=17, padded=0, bias=True, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=dtype).requires_grad_()
    weight = torch.randn(V + padded, H, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(V + padded, generator=g, dtype=dtype).requires_grad_() if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[0, 3, 4, 11]] = -100
    return hidden, weight, b, labels


def _reference(hidden, weight, bias, labels, vocab, eps):
    logits = F.linear(hidden, weight[:vocab], None if bias is None else bias[:vocab])
    return F.cross_entropy(logits, labels, ignore_index=-100, label_smoothing=eps, reduction="sum")


def _params(hidden, weight, bias):
    return [t for t in (hidden, weight, bias) if t is not None]


@pytest.mark.parametrize("chunk", [1, 4, 23, 64])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("bias", [True, False])
def test_value_and_gradients_match_full_logits_cross_entropy(chunk, eps, bias):
    hidden, weight, b, labels = _case(padded=3, bias=bias)
    head = Head(weight, b, vocab=17)
    got = fused_linear_cross_entropy(hidden, head, labels, label_smoothing=eps, chunk_size=chunk)
    ref = _reference(hidden, weight, b, labels, 17, eps)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    params = _params(hidden, weight, b)
    for a, r in zip(torch.autograd.grad(got, params), torch.autograd.grad(ref, params), strict=True):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


def test_padded_head_rows_and_ignored_positions_get_no_gradient():
    hidden, weight, b, labels = _case(padded=3)
    loss = fused_linear_cross_entropy(hidden, Head(weight, b, vocab=17), labels, chunk_size=4)
    gh, gw, gb = torch.autograd.grad(loss, [hidden, weight, b])
    assert gw[17:].abs().max() == 0 and gb[17:].abs().max() == 0
    ignored = labels == -100
    assert gh[ignored].abs().max() == 0 and gh[~ignored].abs().min() > 0


@pytest.mark.parametrize("frozen", ["hidden", "head"])
def test_a_frozen_input_gets_no_gradient_and_the_other_the_reference_one(frozen):
    hidden, weight, _, labels = _case(bias=False)
    if frozen == "hidden":  # the body frozen, only the head trains
        hidden = hidden.detach()
    else:  # a frozen head (PEFT adapters on the body)
        weight = weight.detach()
    trained = weight if frozen == "hidden" else hidden
    loss = fused_linear_cross_entropy(hidden, Head(weight), labels, chunk_size=5)
    ref = _reference(hidden, weight, None, labels, 17, 0.0)
    (got,) = torch.autograd.grad(2.5 * loss, [trained])
    (want,) = torch.autograd.grad(2.5 * ref, [trained])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # only the trained input's gradient is built and kept for backward
    saved = fused_linear_cross_entropy(hidden, Head(weight), labels, chunk_size=5).grad_fn.saved_tensors
    assert [t.shape for t in saved] == [trained.shape]


def test_the_objective_trains_ce_through_the_fused_loss_and_evaluates_without_it():
    """Which path the CE-only objective takes: the fused one while training, autograd over chunks when asked for
    (``loss.fused: false``) and no backward graph at all under ``no_grad`` (evaluation)."""
    from sakd.config import LossConfig
    from sakd.models.forward import HiddenAndHead
    from sakd.objective.composite import Objective

    hidden, weight, _, labels = _case(N=24, bias=False)
    student = HiddenAndHead(hidden.reshape(3, 8, -1), weight, None)
    labels = labels.reshape(3, 8)
    fused = Objective(LossConfig(alpha=0.0), vocab_size=17)(student, None, labels, temperature=1.0)
    plain = Objective(LossConfig(alpha=0.0, fused=False), vocab_size=17)(
        student, None, labels, temperature=1.0
    )
    assert type(fused.loss_sum.grad_fn).__name__ == "_FusedLinearCEBackward"
    assert type(plain.loss_sum.grad_fn).__name__ != "_FusedLinearCEBackward"
    torch.testing.assert_close(fused.loss_sum, plain.loss_sum, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        evaluated = Objective(LossConfig(alpha=0.0), vocab_size=17)(student, None, labels, temperature=1.0)
    assert evaluated.loss_sum.grad_fn is None
    torch.testing.assert_close(evaluated.loss_sum, fused.loss_sum.detach(), rtol=1e-12, atol=1e-12)


def test_all_positions_ignored_gives_zero_loss_and_zero_gradient():
    hidden, weight, b, labels = _case()
    labels[:] = -100
    loss = fused_linear_cross_entropy(hidden, Head(weight, b), labels, chunk_size=4)
    assert loss.item() == 0.0
    assert all(g.abs().max() == 0 for g in torch.autograd.grad(loss, [hidden, weight, b]))


def test_half_precision_model_gets_float32_loss_and_its_own_dtype_gradients():
    hidden, weight, _, labels = _case(N=40, H=8, V=50, bias=False, dtype=torch.float32)
    h16, w16 = hidden.detach().bfloat16().requires_grad_(), weight.detach().bfloat16().requires_grad_()
    loss = fused_linear_cross_entropy(h16, Head(w16), labels, chunk_size=16)
    assert loss.dtype == torch.float32
    gh, gw = torch.autograd.grad(loss, [h16, w16])
    assert gh.dtype == gw.dtype == torch.bfloat16
    ref = F.cross_entropy(F.linear(h16, w16).float(), labels, ignore_index=-100, reduction="sum")
    rh, rw = torch.autograd.grad(ref, [h16, w16])
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gh.float(), rh.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gw.float(), rw.float(), rtol=2e-2, atol=2e-2)


def test_bad_arguments_are_refused():
    hidden, weight, _, labels = _case(bias=False)
    with pytest.raises(ValueError, match="label_smoothing"):
        fused_linear_cross_entropy(hidden, Head(weight), labels, label_smoothing=1.5)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_cross_entropy(hidden, Head(weight), labels, chunk_size=0)
    with pytest.raises(ValueError, match=r"\[N, H\]"):
        fused_linear_cross_entropy(hidden, Head(weight), labels[:-1])
