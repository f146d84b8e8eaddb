"""Closed-form gradients of the fused loss through vocabulary bridges and sparse modes
(:mod:`sakd.losses.bucket_grads`, :mod:`sakd.losses.sparse_grads`).

Each configuration is checked three ways: the closed-form fused loss equals the unfused reference on full
logits (``kd_per_position`` + CE, autograd for its gradients), equals the fused loss's own autograd path
(forced), and passes ``gradcheck`` on small double inputs.
"""

import pytest
import torch

from sakd.losses import KINDS, KDSpec, SparseTeacher, fused_linear_divergence, sample_teacher, topk_teacher
from sakd.losses.blend import kd_per_position
from sakd.losses.chunk_loop import ChunkPlan

N, HS, HT, VS, VT, CHUNK = 23, 6, 7, 11, 17, 5
T, ALPHA = 1.7, 0.6

BRIDGES = {
    # student 2, 5, 9 unmapped, teacher ids 1, 3, ... unmapped: a shared tail
    "map_tail": dict(vocab_map=torch.tensor([0, 2, -1, 4, 5, -1, 9, 11, 12, -1, 16])),
    # every student id mapped (the teacher's rest is renormalized away)
    "map_student_inside": dict(vocab_map=torch.tensor([3, 1, 4, 15, 9, 2, 6, 5, 0, 8, 7])),
    # every teacher id mapped to a 17-id student... reversed: a student with ids the teacher lacks, and a
    # teacher whose every id is mapped (vt = 7 below)
    "map_teacher_inside": dict(vocab_map=torch.tensor([0, -1, 1, 2, -1, 3, 4, -1, 5, 6, -1]), vt=7),
    # many-to-one: teacher tokens by the student token their text begins with; 4 and 12 begin with none
    "many_to_one": dict(
        teacher_to_student=torch.tensor([0, 0, 1, 2, -1, 4, 4, 5, 5, 5, 7, 8, -1, 9, 9, 0, 1])
    ),
    # many-to-one where every student id receives a teacher token and every teacher token maps
    "many_to_one_full": dict(
        teacher_to_student=torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 10, 9, 8, 3, 3, 0])
    ),
}


def rand(*shape, seed, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def make(seed=0, vt=VT, dtype=torch.float64, chain=False, n=N):
    hidden = rand(n, HS, seed=seed, dtype=dtype).requires_grad_()
    weight = rand(VS, HS, seed=seed + 1, dtype=dtype).mul(1.5).requires_grad_()
    t_hidden, t_weight = rand(n, HT, seed=seed + 2, dtype=dtype), rand(vt, HT, seed=seed + 3, dtype=dtype)
    gen = torch.Generator().manual_seed(seed + 4)
    labels = torch.randint(0, VS, (n,), generator=gen)
    labels[[1, n - 1]] = -100
    kd_mask = torch.rand(n, generator=gen) > 0.25
    target_logprob = None
    if chain:  # a chain-rule log-probability for about half the positions, NaN elsewhere
        target_logprob = torch.where(
            torch.rand(n, generator=gen) > 0.5, -3 * torch.rand(n, generator=gen, dtype=dtype), float("nan")
        )
    return hidden, weight, t_hidden, t_weight, labels, kd_mask, target_logprob


def fused(hidden, weight, t_hidden, t_weight, labels, kd_mask, target_logprob, spec, bridge, **kw):
    return fused_linear_divergence(
        hidden, weight, t_hidden, t_weight, spec.kind, temperature=spec.temperature, beta=spec.beta,
        skew=spec.skew, chunk_size=CHUNK, labels=labels, alpha=ALPHA, kd_mask=kd_mask,
        target_logprob=target_logprob, reduction="sum", sparse=spec.sparse, top_k=spec.top_k,
        num_samples=spec.num_samples, **bridge, **kw,
    )  # fmt: skip


def reference(hidden, weight, teacher, labels, kd_mask, target_logprob, spec, bridge):
    """The blended sum on full logits: CE everywhere, KD where kd_mask (CE at full weight elsewhere)."""
    logits = hidden @ weight.T
    kd = kd_per_position(
        logits, teacher, spec, targets=labels, target_logprob=target_logprob,
        vocab_map=bridge.get("vocab_map"), teacher_to_student=bridge.get("teacher_to_student"),
    )  # fmt: skip
    valid = labels != -100
    kd = torch.where(kd_mask & valid, kd, 0.0).sum() * spec.temperature**2
    ce = torch.nn.functional.cross_entropy(logits, labels.clamp_min(0), reduction="none")
    ce = torch.where(valid, torch.where(kd_mask, (1 - ALPHA) * ce, ce), 0.0).sum()
    return ALPHA * kd + ce


def autograd_path(monkeypatch, *args, **kw):
    with monkeypatch.context() as m:
        m.setattr(ChunkPlan, "closed_form", property(lambda self: False))
        return fused(*args, **kw)


def check(out, ref, tensors, rtol=1e-9):
    torch.testing.assert_close(out.loss, ref, rtol=rtol, atol=1e-12)
    for a, b in zip(torch.autograd.grad(out.loss, tensors), torch.autograd.grad(ref, tensors), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11)


def bridge_setup(name, seed=0, chain=False, n=N):
    spec = dict(BRIDGES[name])
    vt = spec.pop("vt", VT)
    return make(seed=seed, vt=vt, chain=chain, n=n), spec


@pytest.mark.parametrize("name", list(BRIDGES))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chain", [False, True])
def test_bridges_equal_the_reference_and_the_autograd_path(name, kind, chain, monkeypatch):
    (h, w, th, tw, labels, kd_mask, tlp), bridge = bridge_setup(name, seed=len(name), chain=chain)
    spec = KDSpec(kind, T, beta=0.3, skew=0.2)
    assert ChunkPlan.closed_form.fget  # the closed form is what runs by default (checked below)
    out = fused(h, w, th, tw, labels, kd_mask, tlp, spec, bridge)
    ref = reference(h, w, th @ tw.T, labels, kd_mask, tlp, spec, bridge)
    check(out, ref, [h, w])
    slow = autograd_path(monkeypatch, h, w, th, tw, labels, kd_mask, tlp, spec, bridge)
    torch.testing.assert_close(out.loss, slow.loss, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["subset", "topk_tail"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["map_tail", "many_to_one"])
def test_sparse_modes_on_a_bridge(mode, kind, name, monkeypatch):
    (h, w, th, tw, labels, kd_mask, tlp), bridge = bridge_setup(name, seed=3, chain=True)
    spec = KDSpec(kind, T, beta=0.3, skew=0.2, sparse=mode, top_k=3)
    out = fused(h, w, th, tw, labels, kd_mask, tlp, spec, bridge)
    check(out, reference(h, w, th @ tw.T, labels, kd_mask, tlp, spec, bridge), [h, w])
    slow = autograd_path(monkeypatch, h, w, th, tw, labels, kd_mask, tlp, spec, bridge)
    torch.testing.assert_close(out.loss, slow.loss, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["subset", "topk_tail", "sampled"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stored", [False, True])
def test_sparse_modes_on_one_vocabulary(mode, kind, stored):
    if mode == "sampled" and kind != "fkl":
        pytest.skip("sampled KD estimates forward KL only")
    h, w, th, tw, labels, kd_mask, _ = make(seed=5, vt=VS)
    spec = KDSpec(kind, T, beta=0.3, skew=0.2, sparse=mode, top_k=4, num_samples=6)
    t_logits = th @ tw.T
    if mode == "sampled":  # the fused loss draws once per chunk, in order, from the generator
        gen = torch.Generator().manual_seed(0)
        draws = [
            sample_teacher(t_logits[i : i + CHUNK], 6, temperature=T, generator=gen)
            for i in range(0, N, CHUNK)
        ]
        teacher = SparseTeacher(
            **{f: torch.cat([getattr(d, f) for d in draws]) for f in ("indices", "logprobs", "counts")},
            temperature=T,
        )
    else:
        teacher = topk_teacher(t_logits, 4, temperature=T) if stored else t_logits
    if stored:
        out = fused(h, w, None, None, labels, kd_mask, None, spec, {}, sparse_teacher=teacher)
    else:
        out = fused(h, w, th, tw, labels, kd_mask, None, spec, {}, generator=torch.Generator().manual_seed(0))
    check(out, reference(h, w, teacher, labels, kd_mask, None, spec, {}), [h, w])


def test_stored_teacher_with_minus_inf_entries():
    """A stored top-k signal whose tail is exactly 0 (log 0 = -inf) and a subset with -inf log-probs."""
    h, w, th, tw, labels, kd_mask, _ = make(seed=6, vt=VS)
    stored = topk_teacher(th @ tw.T, VS, temperature=T)  # k = V: the tail is empty, tail_logprob = -inf
    assert torch.isneginf(stored.tail_logprob).all()
    for mode in ("topk_tail", "subset"):
        spec = KDSpec("jsd", T, sparse=mode)
        out = fused(h, w, None, None, labels, kd_mask, None, spec, {}, sparse_teacher=stored)
        assert torch.isfinite(out.loss)
        check(out, reference(h, w, stored, labels, kd_mask, None, spec, {}), [h, w])


def test_blocks_inside_a_chunk(monkeypatch):
    """Blocks of 2 rows inside 5-row chunks (the block loop of the closed forms) change nothing."""
    (h, w, th, tw, labels, kd_mask, tlp), bridge = bridge_setup("many_to_one", chain=True)
    spec = KDSpec("srkl", T, skew=0.3)
    whole = fused(h, w, th, tw, labels, kd_mask, tlp, spec, bridge)
    monkeypatch.setattr("sakd.losses.logit_grads.BLOCK_ELEMENTS", 2 * VT)
    monkeypatch.setattr("sakd.losses.chunk_loop.block_rows", lambda rows, vocab: 2)
    blocks = fused(h, w, th, tw, labels, kd_mask, tlp, spec, bridge)
    torch.testing.assert_close(blocks.loss, whole.loss, rtol=1e-12, atol=0)
    check(blocks, reference(h, w, th @ tw.T, labels, kd_mask, tlp, spec, bridge), [h, w])


GRADCHECK = [
    ("map_tail", None, "fkl"),
    ("map_tail", None, "jsd"),
    ("map_student_inside", None, "rkl"),
    ("map_teacher_inside", None, "skl"),
    ("many_to_one", None, "tvd"),
    ("many_to_one", None, "srkl"),
    ("many_to_one", "topk_tail", "fkl"),
    ("map_tail", "subset", "rkl"),
    (None, "subset", "jsd"),
    (None, "topk_tail", "rkl"),
    (None, "sampled", "fkl"),
]


@pytest.mark.parametrize(("name", "mode", "kind"), GRADCHECK)
def test_gradcheck(name, mode, kind):
    if name is None:  # 9 rows: two chunks, and few enough inputs for finite differences
        (h, w, th, tw, labels, kd_mask, tlp), bridge = make(seed=9, vt=VS, n=9), {}
    else:
        (h, w, th, tw, labels, kd_mask, tlp), bridge = bridge_setup(name, seed=9, chain=True, n=9)
    spec = KDSpec(kind, T, beta=0.4, skew=0.3, sparse=mode, top_k=3, num_samples=5)
    bias = rand(VS, seed=10).requires_grad_()

    def f(hidden, weight, bias):
        return fused(
            hidden, weight, th, tw, labels, kd_mask, tlp, spec, bridge,
            student_head_bias=bias, generator=torch.Generator().manual_seed(1),
        ).loss  # fmt: skip

    assert torch.autograd.gradcheck(f, (h, w, bias))


def test_closed_form_covers_all_but_the_documented_fallbacks():
    def plan(**kw):
        base = dict(
            spec=KDSpec(), valid=torch.ones(2, dtype=torch.bool), weights=None, labels=None,
            sparse_teacher=None, alpha=1.0, kd_scale=1.0, denominator=1.0, label_smoothing=0.0,
            ignore_index=-100, chunk_size=4, vocab_map=None, teacher_to_student=None, kd_valid=None,
            target_logprob=None, generator=None, needs_grad=(True, True, False),
        )  # fmt: skip
        return ChunkPlan(**{**base, **kw})

    vmap = torch.tensor([0, 1])
    stored = topk_teacher(torch.randn(2, 3), 2)
    assert plan().closed_form and plan(vocab_map=vmap).closed_form
    assert plan(spec=KDSpec(sparse="sampled")).closed_form and plan(sparse_teacher=stored).closed_form
    assert plan(vocab_map=vmap, spec=KDSpec(sparse="topk_tail")).closed_form
    assert not plan(needs_grad=(False, False, False)).closed_form  # evaluation: values only
    assert not plan(vocab_map=vmap, spec=KDSpec(uld_weight=0.5)).closed_form
    assert not plan(vocab_map=vmap, spec=KDSpec(sparse="sampled")).closed_form
    assert not plan(vocab_map=vmap, sparse_teacher=stored, spec=KDSpec(sparse="topk_tail")).closed_form
