"""The fused, chunked loss equals the unfused one (values and gradients) in every configuration."""

import pytest
import torch

from sakd.losses import (
    KINDS,
    KDSpec,
    distill_loss,
    fused_linear_divergence,
    topk_teacher,
)

N, HS, HT, V = 37, 6, 10, 13


def rand(*shape, seed, scale=1.0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * scale


def setup(seed=0, dtype=torch.float64, vt=V):
    student = {
        "hidden": rand(N, HS, seed=seed, dtype=dtype).requires_grad_(),
        "weight": rand(V, HS, seed=seed + 1, dtype=dtype).requires_grad_(),
        "bias": rand(V, seed=seed + 2, dtype=dtype).requires_grad_(),
    }
    teacher = {
        "hidden": rand(N, HT, seed=seed + 3, dtype=dtype),
        "weight": rand(vt, HT, seed=seed + 4, dtype=dtype),
    }
    gen = torch.Generator().manual_seed(seed + 5)
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[[0, 9, 20]] = -100
    mask = torch.rand(N, generator=gen) > 0.2
    weights = torch.rand(N, generator=gen, dtype=dtype) + 0.5
    return student, teacher, labels, mask, weights


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


def assert_same_grads(loss, reference, tensors, *, rtol=1e-10, atol=1e-14):
    """The two losses' gradients with respect to ``tensors`` agree, tensor by tensor."""
    for a, b in zip(grads(loss, tensors), grads(reference, tensors), strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("kind", KINDS)
def test_fused_equals_unfused_with_blend_mask_weights_bias(kind):
    st, te, labels, mask, weights = setup()
    kw = dict(temperature=2.0, beta=0.3, skew=0.2)
    fused = fused_linear_divergence(
        st["hidden"], st["weight"], te["hidden"], te["weight"], kind,
        chunk_size=8, labels=labels, alpha=0.6, mask=mask, weights=weights,
        label_smoothing=0.1, student_head_bias=st["bias"], **kw,
    )  # fmt: skip
    plain = distill_loss(
        st["hidden"] @ st["weight"].T + st["bias"], te["hidden"] @ te["weight"].T, labels,
        spec=KDSpec(kind, **kw), alpha=0.6, mask=mask, weights=weights, label_smoothing=0.1,
    )  # fmt: skip
    torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(fused.kd, plain.kd, rtol=1e-12, atol=0)
    torch.testing.assert_close(fused.ce, plain.ce, rtol=1e-12, atol=0)
    assert fused.num_tokens == plain.num_tokens == (mask & (labels != -100)).sum()
    tensors = list(st.values())
    assert_same_grads(fused.loss, plain.loss, tensors)


@pytest.mark.parametrize("chunk_size", [1, 8, 36, 37, 1000])
def test_chunk_size_does_not_change_the_result_float32(chunk_size):
    st, te, labels, _, _ = setup(seed=1, dtype=torch.float32)
    fused = fused_linear_divergence(
        st["hidden"],
        st["weight"],
        te["hidden"],
        te["weight"],
        "fkl",
        chunk_size=chunk_size,
        labels=labels,
        alpha=0.5,
    )
    plain = distill_loss(st["hidden"] @ st["weight"].T, te["hidden"] @ te["weight"].T, labels, alpha=0.5)
    torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-5, atol=0)
    tensors = [st["hidden"], st["weight"]]
    assert_same_grads(fused.loss, plain.loss, tensors, rtol=1e-4, atol=1e-6)


def test_batched_input_and_sum_reduction():
    st, te, labels, mask, _ = setup(seed=2)
    shape = (1, N)  # [B, L, H] with B·L = N
    args = (
        st["hidden"].reshape(*shape, HS),
        st["weight"],
        te["hidden"].reshape(*shape, HT),
        te["weight"],
        "jsd",
    )
    total = fused_linear_divergence(*args, chunk_size=5, mask=mask.reshape(shape), reduction="sum")
    mean = fused_linear_divergence(*args, chunk_size=5, mask=mask.reshape(shape))
    torch.testing.assert_close(total.loss, mean.loss * mask.sum())
    plain = distill_loss(
        st["hidden"] @ st["weight"].T,
        te["hidden"] @ te["weight"].T,
        spec=KDSpec("jsd"),
        mask=mask,
        reduction="sum",
    )
    torch.testing.assert_close(total.loss, plain.loss)
    (g_sum,) = grads(total.loss, [st["weight"]])
    (g_mean,) = grads(mean.loss, [st["weight"]])
    torch.testing.assert_close(g_sum, g_mean * mask.sum())


def test_grad_output_scales_gradients():
    st, te, _, _, _ = setup(seed=3)
    out = fused_linear_divergence(st["hidden"], st["weight"], te["hidden"], te["weight"], "fkl", chunk_size=8)
    g1 = grads(out.loss, [st["hidden"], st["weight"]])
    out = fused_linear_divergence(st["hidden"], st["weight"], te["hidden"], te["weight"], "fkl", chunk_size=8)
    g3 = grads(-3.0 * out.loss, [st["hidden"], st["weight"]])
    for a, b in zip(g1, g3, strict=True):
        torch.testing.assert_close(b, -3.0 * a)


def test_tied_embeddings_accumulate_both_gradients():
    gen = torch.Generator().manual_seed(4)
    embedding = torch.randn(V, HS, generator=gen, dtype=torch.float64, requires_grad=True)
    proj = torch.randn(HS, HS, generator=gen, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, V, (N,), generator=gen)
    teacher_hidden = torch.randn(N, HT, generator=gen, dtype=torch.float64)
    teacher_weight = torch.randn(V, HT, generator=gen, dtype=torch.float64)
    labels = torch.roll(ids, -1)

    def student_hidden():
        return torch.tanh(embedding[ids] @ proj)

    fused = fused_linear_divergence(
        student_hidden(),
        embedding,
        teacher_hidden,
        teacher_weight,
        "skl",
        chunk_size=8,
        labels=labels,
        alpha=0.5,
    )
    plain = distill_loss(
        student_hidden() @ embedding.T,
        teacher_hidden @ teacher_weight.T,
        labels,
        spec=KDSpec("skl"),
        alpha=0.5,
    )
    g_fused, g_plain = grads(fused.loss, [embedding, proj]), grads(plain.loss, [embedding, proj])
    for a, b in zip(g_fused, g_plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    (head_only,) = grads(
        fused_linear_divergence(
            student_hidden().detach(),
            embedding,
            teacher_hidden,
            teacher_weight,
            "skl",
            labels=labels,
            alpha=0.5,
        ).loss,
        [embedding],
    )
    assert (g_fused[0] - head_only).abs().max() > 1e-6  # the embedding-lookup path contributed too


def test_teacher_never_gets_gradients():
    st, te, _, _, _ = setup(seed=5)
    t_hidden = te["hidden"].clone().requires_grad_()
    t_weight = te["weight"].clone().requires_grad_()
    out = fused_linear_divergence(st["hidden"], st["weight"], t_hidden, t_weight, "rkl", chunk_size=8)
    out.loss.backward()
    assert t_hidden.grad is None and t_weight.grad is None
    assert st["hidden"].grad is not None and st["weight"].grad is not None


def test_no_grad_mode_and_fully_masked():
    st, te, _, _, _ = setup(seed=6)
    with torch.no_grad():
        out = fused_linear_divergence(st["hidden"], st["weight"], te["hidden"], te["weight"], "fkl")
    assert not out.loss.requires_grad and out.loss > 0
    mask = torch.zeros(N, dtype=torch.bool)
    out = fused_linear_divergence(st["hidden"], st["weight"], te["hidden"], te["weight"], "fkl", mask=mask)
    assert out.loss.item() == 0.0 and out.num_tokens.item() == 0
    g_hidden, g_weight = grads(out.loss, [st["hidden"], st["weight"]])
    assert not g_hidden.any() and not g_weight.any()


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck(kind):
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)
    t_hidden = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    t_weight = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    labels = torch.tensor([1, -100, 3, 0, 5])
    weights = torch.rand(5, generator=gen, dtype=torch.float64)

    def f(hidden, weight, bias):
        return fused_linear_divergence(
            hidden, weight, t_hidden, t_weight, kind, temperature=1.5, chunk_size=2, beta=0.3,
            labels=labels, alpha=0.7, weights=weights, student_head_bias=bias,
        ).loss  # fmt: skip

    assert torch.autograd.gradcheck(f, (hidden, weight, bias))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_is_finite_float32(dtype):
    st, te, labels, _, _ = setup(seed=8, dtype=torch.float32)
    hidden = (st["hidden"].detach() * 4).to(dtype).requires_grad_()
    weight = (st["weight"].detach() * 4).to(dtype).requires_grad_()
    out = fused_linear_divergence(
        hidden,
        weight,
        (te["hidden"] * 4).to(dtype),
        (te["weight"] * 4).to(dtype),
        "jsd",
        chunk_size=8,
        labels=labels,
        alpha=0.5,
    )
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    ref = distill_loss(
        hidden.float() @ weight.float().T,
        (te["hidden"] * 4).to(dtype).float() @ (te["weight"] * 4).to(dtype).float().T,
        labels,
        spec=KDSpec("jsd"),
        alpha=0.5,
    )
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=2e-2)
    out.loss.backward()
    assert (
        hidden.grad.dtype == dtype and torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()
    )


def test_bad_arguments_raise():
    st, te, labels, _, _ = setup(seed=17)
    args = (st["hidden"], st["weight"], te["hidden"], te["weight"], "fkl")
    with pytest.raises(ValueError, match="label_smoothing"):
        fused_linear_divergence(*args, labels=labels, label_smoothing=1.5)
    with pytest.raises(ValueError, match="'none'"):
        fused_linear_divergence(*args, reduction="none")
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_divergence(*args, chunk_size=0)
    with pytest.raises(ValueError, match="positions"):
        fused_linear_divergence(st["hidden"], st["weight"], te["hidden"][:-1], te["weight"], "fkl")
    with pytest.raises(ValueError, match="sparse mode"):
        fused_linear_divergence(
            st["hidden"],
            st["weight"],
            None,
            None,
            sparse_teacher=topk_teacher(te["hidden"] @ te["weight"].T, 3),
        )
    with pytest.raises(ValueError, match="no labels"):
        fused_linear_divergence(*args, alpha=0.5)


def test_no_rows_give_a_zero_loss_and_zero_gradients():
    """A micro-batch with no position at all (one-token rows: nothing to predict) is a zero contribution,
    not a crash (it was a ZeroDivisionError, then an empty torch.stack)."""
    h = torch.randn(0, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(40, 8, dtype=torch.float64, requires_grad=True)
    out = fused_linear_divergence(
        h,
        w,
        torch.randn(0, 8, dtype=torch.float64),
        torch.randn(40, 8, dtype=torch.float64),
        "fkl",
        chunk_size=16,
    )
    out.loss.backward()
    assert float(out.loss) == 0.0 and w.grad is not None and float(w.grad.abs().sum()) == 0.0
