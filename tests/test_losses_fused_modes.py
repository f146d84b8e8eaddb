"""The fused loss across vocabularies (vocab maps) and in the sparse modes, against the unfused one; and how a
chunk is split into row blocks. Split from tests/test_losses_fused.py (its helpers are shared from there)."""

import pytest
import torch
from test_losses_fused import N, V, assert_same_grads, setup

from sakd.losses import (
    KDSpec,
    SparseTeacher,
    distill_loss,
    fused_linear_divergence,
    sample_teacher,
    topk_teacher,
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
    assert_same_grads(fused.loss, plain.loss, tensors)


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
    assert_same_grads(fused.loss, plain.loss, tensors)


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
    assert_same_grads(fused.loss, plain.loss, tensors)


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
