"""The fused, chunked loss equals the unfused one (values and gradients) in every configuration."""

import pytest
import torch

from sakd.losses import (
    KINDS,
    KDSpec,
    SparseTeacher,
    distill_loss,
    fused_linear_divergence,
    sample_teacher,
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
    for g_fused, g_plain in zip(grads(fused.loss, tensors), grads(plain.loss, tensors), strict=True):
        torch.testing.assert_close(g_fused, g_plain, rtol=1e-10, atol=1e-14)


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
    for g_fused, g_plain in zip(grads(fused.loss, tensors), grads(plain.loss, tensors), strict=True):
        torch.testing.assert_close(g_fused, g_plain, rtol=1e-4, atol=1e-6)


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


def test_vocab_mismatch_needs_a_map():
    st, te, _, _, _ = setup(seed=9, vt=V + 4)
    with pytest.raises(ValueError, match="vocab_map"):
        fused_linear_divergence(st["hidden"], st["weight"], te["hidden"], te["weight"], "fkl")


def test_identity_vocab_map_is_the_plain_loss():
    st, te, _, _, _ = setup(seed=10)
    args = (st["hidden"], st["weight"], te["hidden"], te["weight"], "srkl")
    mapped = fused_linear_divergence(*args, chunk_size=8, vocab_map=torch.arange(V))
    plain = fused_linear_divergence(*args, chunk_size=8)
    torch.testing.assert_close(mapped.loss, plain.loss, rtol=1e-12, atol=0)


def test_vocab_map_projects_onto_mapped_ids_plus_tail():
    vt = V + 5
    st, te, _, _, _ = setup(seed=11, vt=vt)
    vocab_map = torch.arange(V)
    vocab_map[[2, 7]] = -1  # student tokens the teacher lacks
    vocab_map[4] = V + 3  # a student token found elsewhere in the teacher vocab
    out = fused_linear_divergence(
        st["hidden"], st["weight"], te["hidden"], te["weight"], "fkl", chunk_size=8, vocab_map=vocab_map
    )
    q = torch.softmax(st["hidden"] @ st["weight"].T, -1)
    p = torch.softmax(te["hidden"] @ te["weight"].T, -1)
    kept = vocab_map >= 0
    p_buckets = torch.cat([p[:, vocab_map[kept]], 1 - p[:, vocab_map[kept]].sum(-1, keepdim=True)], -1)
    q_buckets = torch.cat([q[:, kept], q[:, ~kept].sum(-1, keepdim=True)], -1)
    want = (p_buckets * (p_buckets.log() - q_buckets.log())).sum(-1).mean()
    torch.testing.assert_close(out.loss, want)
    with pytest.raises(ValueError, match="same teacher token"):
        fused_linear_divergence(
            st["hidden"],
            st["weight"],
            te["hidden"],
            te["weight"],
            "fkl",
            vocab_map=torch.zeros(V, dtype=torch.long),
        )


@pytest.mark.parametrize("mode", ["subset", "topk_tail", "sampled"])
def test_sparse_modes_through_the_fused_path(mode):
    st, te, labels, mask, _ = setup(seed=12)
    kind = "fkl" if mode == "sampled" else "jsd"
    spec = KDSpec(kind, temperature=1.5, sparse=mode, top_k=4, num_samples=16)
    fused = fused_linear_divergence(
        st["hidden"], st["weight"], te["hidden"], te["weight"], kind, temperature=1.5, chunk_size=8,
        labels=labels, alpha=0.5, mask=mask, sparse=mode, top_k=4, num_samples=16,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    plain_logits = st["hidden"] @ st["weight"].T
    teacher_logits = te["hidden"] @ te["weight"].T
    if mode == "sampled":  # the same draws: one per chunk, in order, from the same generator
        gen = torch.Generator().manual_seed(0)
        draws = [
            sample_teacher(teacher_logits[i : i + 8], 16, temperature=1.5, generator=gen)
            for i in range(0, N, 8)
        ]
        fields = {f: torch.cat([getattr(d, f) for d in draws]) for f in ("indices", "logprobs", "counts")}
        teacher = SparseTeacher(temperature=1.5, **fields)
    else:
        teacher = teacher_logits
    plain = distill_loss(plain_logits, teacher, labels, spec=spec, alpha=0.5, mask=mask)
    torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-12, atol=0)
    tensors = [st["hidden"], st["weight"]]
    for a, b in zip(grads(fused.loss, tensors), grads(plain.loss, tensors), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_stored_sparse_teacher_through_the_fused_path():
    st, te, labels, _, _ = setup(seed=13)
    stored = topk_teacher(te["hidden"] @ te["weight"].T, 5, temperature=2.0)
    fused = fused_linear_divergence(
        st["hidden"], st["weight"], None, None, "rkl", temperature=2.0, chunk_size=8,
        labels=labels, alpha=0.5, sparse="topk_tail", sparse_teacher=stored,
    )  # fmt: skip
    plain = distill_loss(
        st["hidden"] @ st["weight"].T, stored, labels, spec=KDSpec("rkl", 2.0, sparse="topk_tail"), alpha=0.5
    )
    torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-12, atol=0)
    on_the_fly = fused_linear_divergence(
        st["hidden"], st["weight"], te["hidden"], te["weight"], "rkl", temperature=2.0, chunk_size=8,
        labels=labels, alpha=0.5, sparse="topk_tail", top_k=5,
    )  # fmt: skip
    torch.testing.assert_close(fused.loss, on_the_fly.loss, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    ("kind", "beta", "skew"),
    [
        ("jsd", 0.0, 0.1),
        ("jsd", 1.0, 0.1),
        ("skl", 0.5, 0.0),
        ("skl", 0.5, 1.0),
        ("srkl", 0.5, 0.0),
        ("srkl", 0.5, 1.0),
    ],
)
def test_endpoints_through_the_fused_path(kind, beta, skew):
    st, te, labels, _, _ = setup(seed=14)
    fused = fused_linear_divergence(
        st["hidden"], st["weight"], te["hidden"], te["weight"], kind, beta=beta, skew=skew, chunk_size=8,
        labels=labels, alpha=0.5, temperature=1.5,
    )  # fmt: skip
    plain = distill_loss(
        st["hidden"] @ st["weight"].T, te["hidden"] @ te["weight"].T, labels,
        spec=KDSpec(kind, 1.5, beta, skew), alpha=0.5,
    )  # fmt: skip
    torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-12, atol=0)
    tensors = [st["hidden"], st["weight"]]
    for a, b in zip(grads(fused.loss, tensors), grads(plain.loss, tensors), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd", "tvd"])
def test_row_blocks_inside_a_chunk(kind, monkeypatch):
    monkeypatch.setattr("sakd.losses.logit_grads.BLOCK_ELEMENTS", 3 * V)  # 3-row blocks in 8-row chunks
    st, te, labels, mask, weights = setup(seed=15)
    fused = fused_linear_divergence(
        st["hidden"], st["weight"], te["hidden"], te["weight"], kind, chunk_size=8,
        labels=labels, alpha=0.4, mask=mask, weights=weights, label_smoothing=0.2,
    )  # fmt: skip
    plain = distill_loss(
        st["hidden"] @ st["weight"].T, te["hidden"] @ te["weight"].T, labels,
        spec=KDSpec(kind), alpha=0.4, mask=mask, weights=weights, label_smoothing=0.2,
    )  # fmt: skip
    torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-12, atol=0)
    tensors = [st["hidden"], st["weight"]]
    for a, b in zip(grads(fused.loss, tensors), grads(plain.loss, tensors), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_block_rows_split_evenly_under_the_element_budget():
    from sakd.losses.logit_grads import BLOCK_ELEMENTS, block_rows

    assert block_rows(128, 49_152) == 19  # 21 rows fit: 7 equal blocks of 19 instead of 6 x 21 + 2
    assert block_rows(37, 13) == 37
    assert block_rows(5, 10 * BLOCK_ELEMENTS) == 1
    assert all(block_rows(r, 151_936) * 151_936 <= BLOCK_ELEMENTS for r in (1, 100, 1024))


def test_vocab_map_of_a_student_vocabulary_inside_the_teachers():
    vt = V + 5
    st, te, _, _, _ = setup(seed=16, vt=vt)
    vocab_map = torch.randperm(vt, generator=torch.Generator().manual_seed(0))[:V]
    out = fused_linear_divergence(
        st["hidden"], st["weight"], te["hidden"], te["weight"], "rkl", chunk_size=8, vocab_map=vocab_map
    )
    q = torch.softmax(st["hidden"] @ st["weight"].T, -1)
    p = torch.softmax(te["hidden"] @ te["weight"].T, -1)[:, vocab_map]
    p = p / p.sum(-1, keepdim=True)  # the teacher's unmatched mass is dropped, not a tail
    torch.testing.assert_close(out.loss, (q * (q.log() - p.log())).sum(-1).mean())


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
