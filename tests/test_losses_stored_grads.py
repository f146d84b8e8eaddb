"""The fused losses build the gradient of a SUM in their forward, before the trainer's 1 / tokens and the loss
scale apply (sakd.losses.stored_grads). An fp16 model's head gradient must not overflow there where the mean's is
small, and the upstream scale must not be rounded to bf16 before it multiplies (a systematic bias). Both fused
losses, the CE alone and the blended KD + CE, against full-logits autograd references."""

import pytest
import torch
import torch.nn.functional as F

from sakd.losses import Head, fused_linear_cross_entropy, fused_linear_divergence


def _ce(h, w, labels, t_h=None, t_w=None):
    return fused_linear_cross_entropy(h, Head(w), labels, chunk_size=512)


def _kd(h, w, labels, t_h, t_w):
    out = fused_linear_divergence(h, w, t_h, t_w, labels=labels, alpha=0.5, reduction="sum", chunk_size=512)
    return out.loss


def _ce_ref(h, w, labels, t_h=None, t_w=None):
    return F.cross_entropy(F.linear(h, w).float(), labels, reduction="sum")


def _kd_ref(h, w, labels, t_h, t_w):
    s = F.log_softmax(F.linear(h, w).float(), -1)
    t = F.log_softmax(F.linear(t_h, t_w).float(), -1)
    kl = (t.exp() * (t - s)).sum()
    return 0.5 * kl + 0.5 * F.nll_loss(s, labels, reduction="sum")


LOSSES = [pytest.param(_ce, _ce_ref, id="ce"), pytest.param(_kd, _kd_ref, id="kd")]


@pytest.mark.parametrize(("loss", "reference"), LOSSES)
def test_bf16_gradient_carries_no_bias_from_rounding_the_upstream_scale(loss, reference):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(512, 32, generator=g).bfloat16().requires_grad_()
    w = torch.randn(300, 32, generator=g).bfloat16().requires_grad_()
    t_h, t_w = torch.randn(512, 16, generator=g).bfloat16(), torch.randn(300, 16, generator=g).bfloat16()
    labels = torch.randint(0, 300, (512,), generator=g)
    n = 3000  # the trainer's 1 / global token count: 1/3000 rounds to bf16 0.14 % high
    (g1,) = torch.autograd.grad(loss(h, w, labels, t_h, t_w), [w])
    (gs,) = torch.autograd.grad(loss(h, w, labels, t_h, t_w) / n, [w])
    expected = g1.float() / n
    bias = (gs.float() * expected).sum() / (expected * expected).sum()
    assert abs(bias.item() - 1.0) < 2e-4  # rounding each element once is unbiased; a rounded 1/n is not


@pytest.mark.parametrize(("loss", "reference"), LOSSES)
def test_fp16_head_gradient_of_the_mean_stays_finite(loss, reference):
    g = torch.Generator().manual_seed(0)
    n = 4096
    h = (torch.randn(n, 16, generator=g) * 2 + 60).half().requires_grad_()
    w = (torch.randn(64, 16, generator=g) * 0.01).half().requires_grad_()
    t_h, t_w = torch.randn(n, 8, generator=g).half(), torch.randn(64, 8, generator=g).half()
    labels = torch.zeros(n, dtype=torch.long)  # one frequent target: its head row's SUM gradient is ~ n * 60
    (gw,) = torch.autograd.grad(loss(h, w, labels, t_h, t_w) / n, [w])
    (rw,) = torch.autograd.grad(reference(h, w, labels, t_h, t_w) / n, [w])
    assert torch.isfinite(rw).all() and rw.abs().max() > 10  # the mean's gradient: finite, not small
    assert gw.dtype == torch.float16 and torch.isfinite(gw).all()
    torch.testing.assert_close(gw.float(), rw.float(), rtol=2e-2, atol=2e-2)
