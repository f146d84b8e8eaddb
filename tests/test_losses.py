"""Dense divergences, cross-entropy and the blended objective against plain PyTorch references."""

import math

import pytest
import torch
import torch.nn.functional as F

from sakd.losses import KINDS, KDSpec, cross_entropy, distill_loss, divergence

NEG_INF = float("-inf")


def reference(student_logits, teacher_logits, kind, temperature=1.0, beta=0.5, skew=0.1):
    """Per-position divergence written directly from the definitions, with probabilities."""
    q = torch.softmax(student_logits.double() / temperature, -1)
    p = torch.softmax(teacher_logits.double() / temperature, -1)

    def kl(a, b):
        return (torch.xlogy(a, a) - torch.xlogy(a, b)).sum(-1)

    if kind == "fkl":
        return kl(p, q)
    if kind == "rkl":
        return kl(q, p)
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if kind == "skl":
        return kl(p, skew * p + (1 - skew) * q)
    if kind == "srkl":
        return kl(q, (1 - skew) * p + skew * q)
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise AssertionError(kind)


def logits(*shape, seed=0, scale=3.0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * scale


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_matches_reference(kind, temperature):
    s, t = logits(3, 4, 13, seed=1), logits(3, 4, 13, seed=2)
    got = divergence(s, t, kind, temperature=temperature, beta=0.3, skew=0.2, reduction="none")
    want = reference(s, t, kind, temperature, beta=0.3, skew=0.2)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert (want > 1e-3).all()


def test_hand_computed_values():
    # p = (1/2, 1/2), q = (3/4, 1/4)
    t = torch.tensor([0.0, 0.0])
    s = torch.tensor([math.log(3.0), 0.0])
    assert divergence(s, t, "fkl").item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    assert divergence(s, t, "rkl").item() == pytest.approx(
        0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel=1e-6
    )
    assert divergence(s, t, "tvd").item() == pytest.approx(0.25, rel=1e-6)
    m = (0.625, 0.375)  # beta = 0.5
    jsd = 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1]))
    jsd += 0.5 * (0.75 * math.log(0.75 / m[0]) + 0.25 * math.log(0.25 / m[1]))
    assert divergence(s, t, "jsd", beta=0.5).item() == pytest.approx(jsd, rel=1e-6)


def test_jsd_endpoints_are_the_kls():
    s, t = logits(5, 17, seed=3), logits(5, 17, seed=4)
    assert torch.equal(divergence(s, t, "jsd", beta=0.0), divergence(s, t, "fkl"))
    assert torch.equal(divergence(s, t, "jsd", beta=1.0), divergence(s, t, "rkl"))
    assert divergence(s, t, "jsd", beta=1e-6) < 1e-3 * divergence(s, t, "fkl")  # the documented jump


def test_zero_skew_is_plain_kl():
    s, t = logits(5, 17, seed=3), logits(5, 17, seed=4)
    assert torch.equal(divergence(s, t, "skl", skew=0.0), divergence(s, t, "fkl"))
    assert torch.equal(divergence(s, t, "srkl", skew=0.0), divergence(s, t, "rkl"))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identical_inputs_give_exactly_zero(kind, dtype):
    x = logits(4, 6, 50, seed=5, dtype=dtype)
    for temperature, beta, skew in [(1.0, 0.5, 0.1), (2.0, 0.1, 0.9), (0.7, 0.9, 0.5)]:
        out = divergence(x, x.clone(), kind, temperature=temperature, beta=beta, skew=skew, reduction="none")
        assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("kind", KINDS)
def test_fully_masked_gives_zero_and_zero_grad(kind):
    s = logits(2, 3, 7, seed=6).requires_grad_()
    t = torch.full((2, 3, 7), NEG_INF, dtype=torch.float64)  # garbage in masked rows
    mask = torch.zeros(2, 3, dtype=torch.bool)
    out = divergence(s, t, kind, mask=mask)
    out.backward()
    assert out.item() == 0.0
    assert torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize("kind", KINDS)
def test_mask_weights_and_reductions(kind):
    s, t = logits(3, 5, 11, seed=7), logits(3, 5, 11, seed=8)
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(0)) > 0.4
    weights = torch.rand(3, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t[~mask] = NEG_INF  # padding rows full of -inf must not leak into the result
    per = reference(s, t.masked_fill(~mask.unsqueeze(-1), 0.0), kind) * weights * mask
    none = divergence(s, t, kind, mask=mask, weights=weights, reduction="none")
    torch.testing.assert_close(none, per)
    assert (none[~mask] == 0).all()
    torch.testing.assert_close(divergence(s, t, kind, mask=mask, weights=weights, reduction="sum"), per.sum())
    mean = divergence(s, t, kind, mask=mask, weights=weights, temperature=2.0, scale_by_t2=True)
    per_t = reference(s, t.masked_fill(~mask.unsqueeze(-1), 0.0), kind, 2.0) * weights * mask
    torch.testing.assert_close(mean, 4.0 * per_t.sum() / mask.sum())


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck(kind):
    s = logits(2, 3, 5, seed=9).requires_grad_()
    t = logits(2, 3, 5, seed=10).requires_grad_()
    mask = torch.tensor([[True, False, True], [True, True, True]])
    weights = torch.rand(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def f(s, t):
        return divergence(s, t, kind, temperature=1.7, beta=0.3, skew=0.2, mask=mask, weights=weights)

    assert torch.autograd.gradcheck(f, (s, t))


@pytest.mark.parametrize("kind", KINDS)
def test_neg_inf_on_both_sides_is_the_smaller_vocabulary(kind):
    s, t = logits(4, 12, seed=11), logits(4, 12, seed=12)
    banned = torch.tensor([0, 5, 11])
    s_inf, t_inf = s.clone(), t.clone()
    s_inf[:, banned], t_inf[:, banned] = NEG_INF, NEG_INF
    s_inf.requires_grad_()
    keep = torch.tensor([i for i in range(12) if i not in banned])
    out = divergence(s_inf, t_inf, kind, beta=0.3, reduction="none")
    torch.testing.assert_close(out, reference(s[:, keep], t[:, keep], kind, beta=0.3))
    out.sum().backward()
    assert torch.isfinite(s_inf.grad).all()
    assert (s_inf.grad[:, banned] == 0).all()


@pytest.mark.parametrize("kind", ["fkl", "jsd", "skl", "srkl", "tvd"])
def test_neg_inf_on_teacher_side_only_stays_finite(kind):
    s, t = logits(4, 12, seed=13), logits(4, 12, seed=14)
    t[:, [2, 7]] = NEG_INF
    s.requires_grad_()
    out = divergence(s, t, kind, reduction="none")
    torch.testing.assert_close(out, reference(s, t, kind))
    out.sum().backward()
    assert torch.isfinite(s.grad).all()


def test_reverse_kl_with_teacher_zero_is_inf_not_nan():
    s, t = logits(2, 6, seed=15), logits(2, 6, seed=16)
    t[:, 1] = NEG_INF
    assert torch.isposinf(divergence(s, t, "rkl", reduction="none")).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_give_finite_float32(kind, dtype):
    s = logits(4, 8, 1000, seed=17, scale=20.0).to(dtype).requires_grad_()
    t = logits(4, 8, 1000, seed=18, scale=20.0).to(dtype)
    out = divergence(s, t, kind, temperature=0.5)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    want = reference(s.detach().double(), t.double(), kind, 0.5).mean()
    assert out.item() == pytest.approx(want.item(), rel=1e-4)
    out.backward()
    assert s.grad.dtype == dtype and torch.isfinite(s.grad).all()


def test_bad_arguments_raise():
    s = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="kind"):
        divergence(s, s, "kl")
    with pytest.raises(ValueError, match="same shape"):
        divergence(s, torch.zeros(2, 6), "fkl")
    with pytest.raises(ValueError, match="beta"):
        divergence(s, s, "jsd", beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        divergence(s, s, "fkl", temperature=0.0)
    with pytest.raises(ValueError, match="reduction"):
        divergence(s, s, "fkl", reduction="avg")


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_torch(smoothing, reduction):
    x = logits(3, 4, 9, seed=19)
    y = torch.randint(0, 9, (3, 4), generator=torch.Generator().manual_seed(3))
    y[0, 1] = y[2, 3] = -100
    got = cross_entropy(x, y, label_smoothing=smoothing, reduction=reduction)
    want = F.cross_entropy(x.reshape(-1, 9), y.reshape(-1), label_smoothing=smoothing, reduction=reduction)
    torch.testing.assert_close(got.reshape(want.shape), want)


def test_cross_entropy_half_precision_and_weights():
    x = logits(6, 50, seed=20, scale=30.0).half()
    y = torch.arange(6)
    w = torch.linspace(0.5, 2.0, 6)
    got = cross_entropy(x, y, weights=w)
    assert got.dtype == torch.float32
    want = (F.cross_entropy(x.float(), y, reduction="none") * w).mean()
    torch.testing.assert_close(got, want)


def test_distill_loss_blend():
    s = logits(2, 5, 11, seed=21).requires_grad_()
    t = logits(2, 5, 11, seed=22)
    y = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(4))
    y[1, 2] = -100
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 0] = False
    w = torch.rand(2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    out = distill_loss(
        s, t, y, spec=KDSpec("fkl", temperature=2.0), alpha=0.7, mask=mask, weights=w, label_smoothing=0.1
    )
    valid = mask & (y != -100)
    kd = (reference(s, t, "fkl", 2.0) * w * valid).sum() / valid.sum() * 4.0
    ce_per = F.cross_entropy(s.reshape(-1, 11), y.reshape(-1), label_smoothing=0.1, reduction="none").reshape(
        2, 5
    )
    ce = (ce_per * w * valid).sum() / valid.sum()
    torch.testing.assert_close(out.loss, 0.7 * kd + 0.3 * ce)
    torch.testing.assert_close(out.kd, kd.detach())
    torch.testing.assert_close(out.ce, ce.detach())
    assert out.num_tokens.item() == 8 and not out.kd.requires_grad and out.loss.requires_grad
    assert set(out.as_dict()) == {"loss", "kd", "ce", "num_tokens"}


def test_distill_loss_without_labels():
    s, t = logits(3, 7, seed=23), logits(3, 7, seed=24)
    out = distill_loss(s, t, spec=KDSpec("rkl"), scale_by_t2=False)
    assert out.ce is None
    torch.testing.assert_close(out.loss, divergence(s, t, "rkl"))
    with pytest.raises(ValueError, match="no labels"):
        distill_loss(s, t, alpha=0.5)
