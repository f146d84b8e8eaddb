"""ULD cross-vocabulary distance and the auxiliary (feature / attention / contrastive) losses."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from sakd.losses.auxiliary import (
    attention_transfer_loss,
    feature_loss,
    info_nce,
    masked_mean_pool,
    project_heads,
)
from sakd.losses.uld import uld_distance
from sakd.objective.projections import group_average_init, layer_pairs
from sakd.objective.terms.attention import AttentionTerm
from sakd.objective.terms.contrastive import ContrastiveTerm
from sakd.objective.terms.feature import FeatureTerm


def randn(*shape, seed=0, scale=1.0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * scale


def logprobs(*shape, seed=0, scale=3.0, dtype=torch.float64):
    return torch.log_softmax(randn(*shape, seed=seed, scale=scale, dtype=dtype), -1)


# --------------------------------------------------------------------------------------- ULD


def uld_reference(student_logprobs, teacher_logprobs, student_mask=None, teacher_mask=None):
    """Row by row in numpy: keep the masked ids, sort descending, zero-pad, Σ|·|."""
    q = np.exp(student_logprobs.detach().numpy().astype(np.float64))
    p = np.exp(teacher_logprobs.detach().numpy().astype(np.float64))
    if student_mask is not None:
        q = q[:, student_mask.numpy()]
    if teacher_mask is not None:
        p = p[:, teacher_mask.numpy()]
    out = []
    for q_row, p_row in zip(q, p, strict=True):
        width = max(len(q_row), len(p_row))
        q_sorted = np.zeros(width)
        p_sorted = np.zeros(width)
        q_sorted[: len(q_row)] = np.sort(q_row)[::-1]
        p_sorted[: len(p_row)] = np.sort(p_row)[::-1]
        out.append(np.abs(q_sorted - p_sorted).sum())
    return np.array(out)


@pytest.mark.parametrize("vs,vt", [(7, 11), (11, 7), (9, 9)])
def test_uld_matches_numpy_reference(vs, vt):
    student, teacher = logprobs(5, vs, seed=1), logprobs(5, vt, seed=2)
    got = uld_distance(student, teacher)
    assert got.shape == (5,)
    np.testing.assert_allclose(got.numpy(), uld_reference(student, teacher), rtol=1e-12, atol=1e-12)
    assert (got > 0).all() and (got <= 2 + 1e-12).all()


def test_uld_zero_for_permutations_and_padding():
    student = logprobs(4, 10, seed=3)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(uld_distance(student, student[:, perm]), torch.zeros(4, dtype=torch.float64))
    # extra zero-probability ids on one side are the same as the zero padding
    padded = torch.cat([student[:, perm], torch.full((4, 5), float("-inf"), dtype=torch.float64)], -1)
    assert torch.equal(uld_distance(student, padded), torch.zeros(4, dtype=torch.float64))


def test_uld_symmetric():
    a, b = logprobs(6, 8, seed=4), logprobs(6, 13, seed=5)
    torch.testing.assert_close(uld_distance(a, b), uld_distance(b, a), rtol=0, atol=0)


def test_uld_gradient_flows_to_student_only():
    student_logits = randn(3, 6, seed=6, scale=2.0).requires_grad_()
    teacher_logits = randn(3, 9, seed=7, scale=2.0).requires_grad_()
    loss = uld_distance(torch.log_softmax(student_logits, -1), torch.log_softmax(teacher_logits, -1).detach())
    loss.sum().backward()
    assert teacher_logits.grad is None
    assert torch.isfinite(student_logits.grad).all() and student_logits.grad.abs().sum() > 0
    # the analytic gradient is right (no ties in random data)
    teacher = torch.log_softmax(teacher_logits.detach(), -1)
    torch.autograd.gradcheck(
        lambda x: uld_distance(torch.log_softmax(x, -1), teacher), (student_logits.detach().requires_grad_(),)
    )


def test_uld_low_precision_inputs_compute_in_float32():
    student = logprobs(2, 5, seed=8, dtype=torch.float32).bfloat16()
    teacher = logprobs(2, 7, seed=9, dtype=torch.float32).bfloat16()
    got = uld_distance(student, teacher)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()


def test_uld_masks_select_without_renormalizing():
    student, teacher = logprobs(4, 8, seed=10), logprobs(4, 12, seed=11)
    student_mask = torch.tensor([True, False, True, True, False, False, True, False])
    teacher_mask = torch.arange(12) % 3 == 0
    got = uld_distance(student, teacher, student_mask=student_mask, teacher_mask=teacher_mask)
    want = uld_reference(student, teacher, student_mask, teacher_mask)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)
    # not renormalized: a full student vs an empty teacher side is the student's kept mass
    nothing = torch.zeros(12, dtype=torch.bool)
    kept_mass = student.exp()[:, student_mask].sum(-1)
    torch.testing.assert_close(
        uld_distance(student, teacher, student_mask=student_mask, teacher_mask=nothing), kept_mass
    )
    # only the masked ids matter: changing the dropped teacher ids changes nothing
    scrambled = teacher.clone()
    scrambled[:, ~teacher_mask] = 0.0
    torch.testing.assert_close(
        uld_distance(student, scrambled, teacher_mask=teacher_mask),
        uld_distance(student, teacher, teacher_mask=teacher_mask),
    )
    with pytest.raises(ValueError, match="teacher_mask"):
        uld_distance(student, teacher, teacher_mask=torch.ones(11, dtype=torch.bool))


def test_uld_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="every dimension but the last"):
        uld_distance(logprobs(3, 5), logprobs(4, 5))


# ------------------------------------------------------------------------------ feature loss


def test_feature_loss_zero_for_identical_inputs_with_identity_projection():
    term = FeatureTerm([(1, 1)], 8, 8, "mse")
    hidden = randn(5, 8, seed=12, dtype=torch.float32)
    projected = term.project(0, hidden)
    torch.testing.assert_close(projected, hidden, rtol=0, atol=0)
    assert feature_loss(hidden, projected, "mse").item() == 0.0
    assert abs(feature_loss(hidden, projected, "cosine").item()) < 1e-6


def test_feature_loss_values_and_mask():
    student, teacher = randn(6, 4, seed=13), randn(6, 4, seed=14)
    mask = torch.tensor([True, True, False, True, False, True])
    mse_rows = ((student - teacher) ** 2).mean(-1)
    torch.testing.assert_close(feature_loss(student, teacher, "mse"), mse_rows.sum())
    torch.testing.assert_close(feature_loss(student, teacher, "mse", mask), mse_rows[mask].sum())
    cos_rows = 1 - (student * teacher).sum(-1) / (student.norm(dim=-1) * teacher.norm(dim=-1))
    torch.testing.assert_close(feature_loss(student, teacher, "cosine", mask), cos_rows[mask].sum())
    # garbage in masked rows neither leaks into the value nor the gradient
    student_nan = student.clone()
    student_nan[2] = float("nan")
    student_nan.requires_grad_()
    for kind in ("mse", "cosine"):
        student_nan.grad = None
        loss = feature_loss(student_nan, teacher, kind, mask)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(student_nan.grad).all()
        assert torch.equal(student_nan.grad[2], torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown feature loss kind"):
        feature_loss(student, teacher, "l1")


def test_feature_loss_cosine_in_0_2():
    rows = randn(64, 5, seed=15, dtype=torch.float32)
    others = randn(64, 5, seed=16, dtype=torch.float32)
    for student, teacher in [(rows, others), (rows, rows), (rows, -rows), (rows, 3 * rows)]:
        for i in range(rows.shape[0]):
            value = feature_loss(student[i : i + 1], teacher[i : i + 1], "cosine").item()
            assert 0.0 <= value <= 2.0
    assert feature_loss(rows[:1], -rows[:1], "cosine").item() == pytest.approx(2.0)


# ------------------------------------------------------------------------------ attention


def attention(b, h, length, seed):
    return torch.softmax(randn(b, h, length, length, seed=seed, scale=2.0, dtype=torch.float32), -1)


def test_head_projection_is_along_the_head_axis():
    proj = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        proj.weight.copy_(torch.arange(16, dtype=torch.float32).reshape(4, 4) / 10)  # non-symmetric
    teacher = attention(2, 4, 4, seed=17)  # Ht = L so that the wrong-axis projection also runs
    got = project_heads(teacher, proj)
    want = torch.einsum("jh,bhst->bjst", proj.weight, teacher)
    torch.testing.assert_close(got, want)
    wrong_axis = proj(teacher)  # the old bug: Linear on the last (key) axis
    assert not torch.allclose(got, wrong_axis, atol=1e-3)
    student = attention(2, 4, 4, seed=18)
    manual = ((student - want) ** 2).mean(dim=(1, 3)).sum()
    torch.testing.assert_close(attention_transfer_loss(student, teacher, proj), manual)
    wrong = ((student - wrong_axis) ** 2).mean(dim=(1, 3)).sum()
    assert not torch.isclose(attention_transfer_loss(student, teacher, proj), wrong)


def test_attention_loss_mask_sums_valid_query_rows():
    proj = nn.Linear(3, 2, bias=False)
    teacher, student = attention(2, 3, 5, seed=19), attention(2, 2, 5, seed=20)
    mask = torch.tensor([[True, True, True, False, False], [True, True, True, True, True]])
    per_row = ((student - project_heads(teacher, proj)) ** 2).mean(dim=(1, 3))
    torch.testing.assert_close(attention_transfer_loss(student, teacher, proj, mask), per_row[mask].sum())
    # garbage in masked query rows (either side) neither leaks into the value nor the gradient
    student_nan, teacher_nan = student.clone(), teacher.clone()
    student_nan[0, :, 4] = float("nan")
    teacher_nan[0, :, 3] = float("inf")
    student_nan.requires_grad_()
    loss = attention_transfer_loss(student_nan, teacher_nan, proj, mask)
    loss.backward()
    torch.testing.assert_close(loss, per_row[mask].sum())
    assert torch.isfinite(student_nan.grad).all() and torch.isfinite(proj.weight.grad).all()
    with pytest.raises(ValueError, match="aligned"):
        attention_transfer_loss(student, attention(2, 3, 4, seed=21), proj)


def test_group_average_init_maps_duplicated_teacher_heads_exactly():
    term = AttentionTerm([(0, 0)], teacher_heads=6, student_heads=3)
    student = attention(2, 3, 5, seed=22)
    teacher = student.repeat_interleave(2, dim=1)  # teacher heads 2j, 2j+1 = student head j
    torch.testing.assert_close(project_heads(teacher, term.proj), student, rtol=0, atol=0)
    assert attention_transfer_loss(student, teacher, term.proj).item() == 0.0
    # not a multiple: uniform 1 / Ht
    weight = torch.empty(2, 5)
    group_average_init(weight)
    assert torch.equal(weight, torch.full((2, 5), 0.2))


# ------------------------------------------------------------------------------ InfoNCE


def test_info_nce_matched_lower_than_shuffled():
    teacher = randn(8, 16, seed=23, dtype=torch.float32)
    student = teacher + 0.1 * randn(8, 16, seed=24, dtype=torch.float32)
    shuffled = student[torch.roll(torch.arange(8), 1)]
    assert info_nce(student, teacher) < info_nce(shuffled, teacher)


def test_info_nce_b2_hand_computation():
    student = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    teacher = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    tau = 0.5
    # normalized: s0 = (0.6, 0.8), s1 = (1, 0); t0 = (0, 1), t1 = (1/√2, 1/√2)
    r = 1 / math.sqrt(2)
    logits = [[0.8 / tau, (0.6 * r + 0.8 * r) / tau], [0.0 / tau, r / tau]]
    ce0 = -logits[0][0] + math.log(math.exp(logits[0][0]) + math.exp(logits[0][1]))
    ce1 = -logits[1][1] + math.log(math.exp(logits[1][0]) + math.exp(logits[1][1]))
    assert info_nce(student, teacher, tau).item() == pytest.approx((ce0 + ce1) / 2, rel=1e-6)


def test_info_nce_single_row_is_zero_and_backpropagates():
    student = randn(1, 4, seed=25, dtype=torch.float32).requires_grad_()
    loss = info_nce(student, randn(1, 4, seed=26, dtype=torch.float32))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))
    with pytest.raises(ValueError, match="temperature"):
        info_nce(student, student, 0.0)


def test_masked_mean_pool():
    hidden = randn(3, 4, 2, seed=27)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True], [False] * 4])
    hidden[0, 3] = float("nan")
    pooled = masked_mean_pool(hidden, mask)
    torch.testing.assert_close(pooled[0], hidden[0, :2].mean(0))
    torch.testing.assert_close(pooled[1], hidden[1].mean(0))
    assert torch.equal(pooled[2], torch.zeros(2, dtype=torch.float64))


# ------------------------------------------------------------------- gradients through the heads


def test_gradients_reach_projections_and_student_not_teacher():
    torch.manual_seed(0)
    b, length, hs, ht = 3, 5, 8, 12
    pairs = [(2, 1), (4, 2)]
    mse, cosine = FeatureTerm(pairs, ht, hs, "mse"), FeatureTerm(pairs, ht, hs, "cosine")
    attn = AttentionTerm([(0, 0)], teacher_heads=4, student_heads=2)
    nce = ContrastiveTerm(ht, hs, temperature=0.07, dim=6)
    heads = nn.ModuleList([mse, cosine, attn, nce])
    assert nce.student.out_features == 6 and nce.teacher.in_features == ht
    student_states = [torch.randn(b, length, hs, requires_grad=True) for _ in range(3)]
    teacher_states = [torch.randn(b, length, ht, requires_grad=True) for _ in range(5)]
    student_attn = torch.softmax(torch.randn(b, 2, length, length), -1).requires_grad_()
    teacher_attn = torch.softmax(torch.randn(b, 4, length, length), -1).requires_grad_()
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[0, 3:] = False
    with torch.no_grad():  # non-finite garbage at masked positions must not reach any gradient
        for tensor in [*student_states, *teacher_states]:
            tensor[0, 4] = float("nan")
        student_attn[0, :, 4] = float("nan")
        teacher_attn[0, :, 4] = float("inf")
    loss = (
        mse.layer_losses(student_states, teacher_states, mask)
        + cosine.layer_losses(student_states, teacher_states, mask)
        + attention_transfer_loss(student_attn, teacher_attn, attn.proj, mask)
        + info_nce(*nce.pair(student_states[-1], teacher_states[-1], mask, mask), 0.07)
    )
    assert torch.isfinite(loss)
    loss.backward()
    for name, param in heads.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
        assert torch.isfinite(param.grad).all(), name
    for tensor in [*teacher_states, teacher_attn]:
        assert tensor.grad is None
    for tensor in [student_states[1], student_states[2], student_attn]:
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0
        assert torch.isfinite(tensor.grad).all()
    assert student_states[0].grad is None  # the embedding output is never matched


# ------------------------------------------------------------------------------ layer pairs


def test_layer_pairs_uniform():
    assert layer_pairs(4, 2) == [(2, 1), (4, 2)]
    assert layer_pairs(4, 2, "uniform") == [(2, 1), (4, 2)]
    assert layer_pairs(3, 3) == [(1, 1), (2, 2), (3, 3)]
    assert layer_pairs(1, 4) == [(1, 1), (1, 2), (1, 3), (1, 4)]  # clamped away from embeddings
    for teacher_layers, student_layers in [(24, 6), (12, 5), (7, 3)]:
        pairs = layer_pairs(teacher_layers, student_layers)
        assert pairs[-1] == (teacher_layers, student_layers)
        assert all(1 <= t <= teacher_layers for t, _ in pairs)


def test_layer_pairs_explicit_and_invalid():
    assert layer_pairs(4, 2, [[1, 1], [4, 2]]) == [(1, 1), (4, 2)]
    for bad in ([[5, 1]], [[0, 1]], [[2, 3]], [[1, 2, 3]], [[1.0, 1]]):
        with pytest.raises(ValueError) as info:
            layer_pairs(4, 2, bad)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="unknown layer mapping"):
        layer_pairs(4, 2, "linear")
