"""Defects of the sparse and cross-tokenizer losses found by review (issue 21, section 5), each against an
independent reference or a property: the fp16 top-k tail, the stored subset's rest bucket across
tokenizers, the on-the-fly sampled draws, and the sampled cache's distribution."""

import pytest
import torch

from sakd.losses import KINDS, SparseTeacher, fused_linear_divergence, sparse_divergence, topk_teacher
from sakd.losses.divergences import divergence_from_logprobs

V, K = 40, 4


def rand(*shape, seed, scale=1.0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * scale


def fp16_topk_cache(teacher_logits: torch.Tensor) -> SparseTeacher:
    """A ``topk`` cache (no tail) whose log-probs are stored in fp16, read back in float32."""
    top = topk_teacher(teacher_logits.double(), K)
    return SparseTeacher(top.indices, top.logprobs.half().float(), top.temperature)


def peaked_teacher(n: int, seed: int) -> torch.Tensor:
    """Teachers so sure of one token that the fp16 top-k mass rounds to 1 at many positions."""
    z = rand(n, V, seed=seed)
    z[torch.arange(n), torch.arange(n) % V] += 12.0 + 6.0 * rand(n, seed=seed + 1).abs()
    return z.float()


@pytest.mark.parametrize("kind", KINDS)
def test_topk_tail_on_a_peaked_fp16_topk_cache_is_finite(kind):
    """Before the tail floor, rkl / srkl were +inf wherever the fp16 top-k mass rounded to >= 1."""
    t = peaked_teacher(64, seed=1)
    stored = fp16_topk_cache(t)
    assert (stored.logprobs.double().exp().sum(-1) >= 1).sum() >= 5  # the case of the defect is present
    student = rand(64, V, seed=3, dtype=torch.float32).requires_grad_()
    loss = sparse_divergence(student, stored, "topk_tail", kind)
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    # the fused closed form, from hidden states and a head
    hidden, head = (
        rand(64, 8, seed=4, dtype=torch.float32).requires_grad_(),
        rand(V, 8, seed=5, dtype=torch.float32),
    )
    head.requires_grad_()
    fused = fused_linear_divergence(
        hidden, head, None, None, kind, sparse="topk_tail", sparse_teacher=stored, chunk_size=16
    )
    g_hidden, g_head = torch.autograd.grad(fused.loss, (hidden, head))
    assert torch.isfinite(fused.loss) and torch.isfinite(g_hidden).all() and torch.isfinite(g_head).all()


@pytest.mark.parametrize("kind", KINDS)
def test_topk_tail_floor_leaves_a_non_peaked_teacher_unchanged(kind):
    """Where the derived tail is above the floor, the buckets are the top-k log-probs and log(1 − Σ p)."""
    t = rand(32, V, seed=6, dtype=torch.float32)
    stored = fp16_topk_cache(t)
    student = rand(32, V, seed=7, dtype=torch.float32)
    got = sparse_divergence(student, stored, "topk_tail", kind, reduction="none")
    q = torch.log_softmax(student, -1)
    q_b = torch.cat(
        [q.gather(-1, stored.indices), torch.log1p(-q.gather(-1, stored.indices).exp().sum(-1, True))], -1
    )
    p_b = torch.cat([stored.logprobs, torch.log1p(-stored.logprobs.exp().sum(-1, True))], -1)
    want = divergence_from_logprobs(q_b, p_b, kind)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    fused = fused_linear_divergence(
        student, torch.eye(V), None, None, kind, sparse="topk_tail", sparse_teacher=stored, chunk_size=8,
        reduction="sum", scale_by_t2=False,
    )  # fmt: skip
    torch.testing.assert_close(fused.loss, want.sum(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["fkl", "rkl", "srkl"])
def test_an_exact_tail_is_not_floored(kind):
    """An exact tail (online top-k, or a topk_tail cache's stored tail) far below TAIL_FLOOR is the tail:
    the loss equals the divergence over the exact k + 1 buckets (the floor is for derived tails only)."""
    z = rand(8, V, seed=11)
    z[:, 0] += 25.0  # exact tail about 1e-10
    top = topk_teacher(z, K)
    q = torch.log_softmax(rand(8, V, seed=12), -1)
    p = torch.log_softmax(z, -1)
    rest = torch.ones_like(p, dtype=torch.bool).scatter_(-1, top.indices, False)
    p_tail = torch.logsumexp(p.masked_fill(~rest, float("-inf")), -1, keepdim=True)
    assert (p_tail.exp() < 1e-8).all()
    q_tail = torch.logsumexp(q.masked_fill(~rest, float("-inf")), -1, keepdim=True)
    want = divergence_from_logprobs(
        torch.cat([q.gather(-1, top.indices), q_tail], -1),
        torch.cat([p.gather(-1, top.indices), p_tail], -1),
        kind,
    )
    got = sparse_divergence(q, top, "topk_tail", kind, reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    stored = SparseTeacher(top.indices, top.logprobs, top.temperature, tail_logprob=p_tail.squeeze(-1))
    torch.testing.assert_close(sparse_divergence(q, stored, "topk_tail", kind, reduction="none"), want)


@pytest.mark.parametrize("kind", ["fkl", "rkl"])
def test_a_peaked_fp16_topk_cache_across_tokenizers_keeps_its_tail(kind):
    """Across tokenizers (an identity map: the same outcomes) the stored topk_tail loss equals one
    tokenizer's, also where the fp16 top-k mass rounds to 1 (there the derived tail is floored, not
    dropped: without it topk_tail turned into subset at those positions)."""
    from sakd.losses.sparse_projection import project_stored_teacher

    t = peaked_teacher(64, seed=1)
    stored = fp16_topk_cache(t)
    q = torch.log_softmax(rand(64, V, seed=3), -1)
    same = sparse_divergence(q, stored, "topk_tail", kind, reduction="none")
    s_b, t_b, _ = project_stored_teacher(q, stored, torch.arange(V), tail=True)
    bridged = divergence_from_logprobs(s_b, t_b, kind)
    torch.testing.assert_close(bridged, same.to(bridged.dtype), rtol=1e-4, atol=1e-5)


def test_knowledge_augmentation_span_probability_is_the_mixtures():
    """With M augmented teachers the chain-rule probability of a multi-token span is mean_m Π_j p_m(j):
    each sampled teacher spells the whole span. It was Π_j mean_m p_m(j)."""
    from sakd.align.positions import span_logprob
    from sakd.objective.chain import inside_spans, teacher_token_logprobs
    from sakd.teacher.moe import AugmentedSignal

    m, length, h, vt = 3, 6, 5, 7
    samples = rand(m, 1, length, h, seed=20, scale=2.0).float()
    head = rand(vt, h, seed=21, scale=2.0).float()
    ids = torch.tensor([[3, 1, 4, 1, 5, 2]])
    anchor, span_end = torch.tensor([[0, 3]]), torch.tensor([[3, 5]])  # spans of 3 and 2 teacher tokens
    multi = torch.ones_like(anchor, dtype=torch.bool)
    teacher = AugmentedSignal(hidden=samples.mean(0), head_weight=head, head_bias=None, samples=samples)
    needed = inside_spans(anchor, span_end, multi, length)
    got = span_logprob(teacher_token_logprobs(teacher, ids, 1.5, needed, vt, 4), anchor, span_end)
    # independent: each sample's probability of the span's tokens, multiplied, then averaged over samples
    probs = torch.softmax(samples.double() @ head.double().T / 1.5, -1)[:, 0]  # [M, L, V]
    want = []
    for a, e in zip(anchor[0].tolist(), span_end[0].tolist(), strict=True):
        per_sample = [
            torch.prod(torch.stack([probs[s, j, ids[0, j + 1]] for j in range(a, e)])) for s in range(m)
        ]
        want.append(torch.stack(per_sample).mean().log())
    want = torch.stack(want).float().unsqueeze(0)
    wrong = torch.stack(
        [
            probs[:, a:e].gather(-1, ids[0, a + 1 : e + 1].expand(m, -1).unsqueeze(-1)).mean(0).log().sum()
            for a, e in ((0, 3), (3, 5))
        ]
    ).float()
    assert (want[0] - wrong).abs().min() > 1e-3  # the example tells the two apart
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _subset_reference(student: torch.Tensor, teacher: torch.Tensor, stored: torch.Tensor, t2s: torch.Tensor):
    """Brute force on the full distributions: the outcomes are the student ids that receive a teacher token
    and one rest outcome (the student ids that receive none, the teacher ids that map to none). Both sides
    are restricted to the outcomes the stored teacher ids reach and renormalized there; forward KL."""
    vs = student.shape[-1]
    receives = torch.zeros(vs, dtype=torch.bool)
    receives[t2s[t2s >= 0]] = True
    out = []
    for row in range(student.shape[0]):
        q, p = torch.softmax(student[row], -1), torch.softmax(teacher[row], -1)
        big_q = {o: q[o] for o in range(vs) if receives[o]}
        big_q["rest"] = q[~receives].sum()
        big_p: dict = {}
        for v in stored[row].tolist():
            o = int(t2s[v]) if t2s[v] >= 0 else "rest"
            big_p[o] = big_p.get(o, 0.0) + p[v]
        reach = list(big_p)
        pp = torch.stack([big_p[o] for o in reach])
        qq = torch.stack([big_q[o] for o in reach])
        pp, qq = pp / pp.sum(), qq / qq.sum()
        out.append((pp * (pp / qq).log()).sum())
    return torch.stack(out)


def test_stored_subset_across_tokenizers_rest_bucket_covers_the_same_outcomes():
    """The student's rest bucket is its mass on the ids that receive no teacher token, whether or not a
    stored id is unmapped (it was all of its mass outside the stored buckets when one was)."""
    from sakd.losses import KDSpec
    from sakd.losses.blend import kd_per_position

    vs, vt = 9, 12
    t2s = torch.tensor([0, 1, 2, 3, 4, 5, 5, 6, -1, -1, 6, 0])  # ids 7, 8 receive nothing; 8, 9 unmapped
    student, teacher = rand(2, vs, seed=30), rand(2, vt, seed=31)
    teacher[0, 8] = teacher[1, 8] = -9.0
    teacher[0, 9] = 6.0  # row 0: an unmapped id among the stored top-4; row 1: none
    teacher[1, 9] = -9.0
    stored = topk_teacher(teacher, 4)
    unmapped = t2s[stored.indices] < 0
    assert unmapped[0].any() and not unmapped[1].any()
    got = kd_per_position(student, stored, KDSpec(sparse="subset"), teacher_to_student=t2s)
    torch.testing.assert_close(
        got, _subset_reference(student, teacher, stored.indices, t2s), rtol=1e-10, atol=1e-12
    )


CHI2_7DF_P001 = 24.32  # the 0.999 quantile of the chi-square distribution with 7 degrees of freedom


def _cached_draw_counts(z: torch.Tensor, temperature: float, positions: int, draws: int) -> torch.Tensor:
    """Pooled counts of the ids a ``sampled`` cache stores for one block whose every position has logits z."""
    from sakd.models.forward import HiddenAndHead
    from sakd.teacher.cache.extract import block_signals
    from sakd.teacher.cache.manifest import SignalSpec

    v = z.numel()
    spec = SignalSpec(
        mode="sampled", top_k=None, num_samples=draws, temperature=temperature, values_dtype="float32",
        vocab_size=v, index_bits=3, block_size=positions, router_shape=None, seed=7,
    )  # fmt: skip
    out = HiddenAndHead(
        hidden=torch.ones(1, positions, 1), head_weight=z.float().reshape(v, 1), head_bias=None
    )
    blocks = {
        "input_ids": torch.zeros(1, positions, dtype=torch.long), "char_end": torch.zeros(1, positions),
        "char_base": torch.zeros(1), "follows_previous": torch.zeros(1, dtype=torch.bool),
        "next_id": torch.zeros(1, dtype=torch.long), "block_index": torch.tensor([3]),
    }  # fmt: skip
    (signal,) = block_signals(out, blocks, spec)
    counts = torch.zeros(v, dtype=torch.float64)
    counts.index_add_(0, signal.indices.reshape(-1), signal.counts.reshape(-1).double())
    assert counts.sum() == positions * draws
    return counts


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = counts.sum() * probs
    return float(((counts - expected) ** 2 / expected).sum())


def test_sampled_cache_draws_follow_the_teacher_at_the_cache_temperature():
    """Pearson's chi-square of 8192 pooled draws (512 positions, two draw chunks, x 16) against softmax(z/T)
    stays under the 0.999 quantile; the same test rejects softmax(z) for draws at T = 2 and softmax(z/2) for
    draws at T = 1, so a cache drawing at the wrong temperature would fail it."""
    z = torch.tensor([3.0, 2.0, 1.5, 1.0, 0.0, -0.5, -1.0, -2.0], dtype=torch.float64)
    at_two = _cached_draw_counts(z, 2.0, 512, 16)
    assert _chi2(at_two, torch.softmax(z / 2.0, -1)) < CHI2_7DF_P001
    assert _chi2(at_two, torch.softmax(z, -1)) > 10 * CHI2_7DF_P001
    at_one = _cached_draw_counts(z, 1.0, 512, 16)
    assert _chi2(at_one, torch.softmax(z, -1)) < CHI2_7DF_P001
    assert _chi2(at_one, torch.softmax(z / 2.0, -1)) > 10 * CHI2_7DF_P001


def _sampled_objective_loss(
    chunk_size, fused, sample_ids, student_hidden, teacher_hidden, head_s, head_t, labels
):
    """``sparse=sampled`` through the Objective as a run computes it: summed loss and student-hidden gradient."""
    from sakd.config import LossConfig
    from sakd.models.forward import HiddenAndHead
    from sakd.objective.composite import Objective

    cfg = LossConfig(
        sparse="sampled", num_samples=5, temperature=1.5, alpha=0.7, chunk_size=chunk_size, fused=fused
    )
    objective = Objective(cfg, vocab_size=head_s.shape[0], seed=11)
    hidden = student_hidden.clone().requires_grad_()
    out = objective(
        HiddenAndHead(hidden, head_s, None), HiddenAndHead(teacher_hidden, head_t, None), labels,
        temperature=1.5, batch={"sample_ids": sample_ids},
    )  # fmt: skip
    (grad,) = torch.autograd.grad(out.loss_sum, hidden)
    return out.loss_sum.detach(), grad


def test_on_the_fly_sampled_loss_does_not_depend_on_how_the_step_is_split():
    """The on-the-fly draws come from each block's stream (seed, block id), not from the global RNG per chunk:
    the same loss and gradient for any chunk size, fused or not, whole batch or two micro-batches."""
    b, length, h, v = 4, 9, 6, 30
    sh, th = rand(b, length, h, seed=40), rand(b, length, h, seed=41)
    head_s, head_t = rand(v, h, seed=42), rand(v, h, seed=43, scale=2.0)
    labels = torch.randint(0, v, (b, length), generator=torch.Generator().manual_seed(44))
    ids = torch.tensor([17, 3, 250, 8])
    args = (sh, th, head_s, head_t, labels)
    torch.manual_seed(0)
    ref_loss, ref_grad = _sampled_objective_loss(4, True, ids, *args)
    for chunk, fused in ((3, True), (7, True), (64, True), ("auto", False)):
        torch.manual_seed(chunk if isinstance(chunk, int) else 1)  # the global RNG plays no part
        loss, grad = _sampled_objective_loss(chunk, fused, ids, *args)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-15)
    halves = [
        _sampled_objective_loss(5, True, ids[r], sh[r], th[r], head_s, head_t, labels[r])
        for r in (slice(0, 2), slice(2, 4))
    ]
    torch.testing.assert_close(halves[0][0] + halves[1][0], ref_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.cat([halves[0][1], halves[1][1]]), ref_grad, rtol=1e-12, atol=1e-15)


def test_block_draws_differ_between_positions_and_blocks_and_match_the_cache():
    """Every position of a block (same distribution everywhere) gets its own draws, two blocks different
    ones; and they are the draws a sampled cache stores for that block (one function, one stream)."""
    from sakd.losses import BlockDraws
    from sakd.losses.draws import draw_blocks

    z = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 0.2, 0.9, -0.2], dtype=torch.float64)
    length = 300  # two draw chunks
    lp = torch.log_softmax(z.float(), -1).expand(2 * length, -1)
    drawn = draw_blocks(lambda r: lp[r], 2 * length, BlockDraws(7, torch.tensor([3, 4])), 16, 1.0, lp.device)
    rows = [tuple(drawn.indices[i].tolist()) for i in range(2 * length)]
    assert len(set(rows[:length])) > 0.9 * length  # positions of one block: (almost) all different draws
    assert rows[:length] != rows[length:]  # another block: another stream
    cached = _cached_draw_counts  # the cache's draws of block 3 with seed 7 (same helper as the chi-square)
    counts = torch.zeros(z.numel(), dtype=torch.float64)
    counts.index_add_(0, drawn.indices[:length].reshape(-1), drawn.counts[:length].reshape(-1).double())
    torch.testing.assert_close(counts, cached(z, 1.0, length, 16))
