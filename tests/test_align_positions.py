"""Position alignment by character spans, and the cross-vocabulary KD pieces it feeds."""

from __future__ import annotations

import math

import pytest
import torch

from sakd.align.positions import align_spans, identity_alignment, span_logprob
from sakd.commands.demo import train_tokenizer
from sakd.losses import fused_linear_divergence, kd_per_position, project_to_shared_support
from sakd.losses.blend import KDSpec
from sakd.losses.vocab_map import project_with_targets


def test_hand_made_splits():
    # text "the cat": student "the| cat" ; teacher "th|e| c|at"
    student = [(0, 3), (3, 7)]
    teacher = [(0, 2), (2, 3), (3, 5), (5, 7)]
    al = align_spans(student, teacher)
    assert al.anchor.tolist() == [1, 3]  # both student tokens end on shared boundaries
    assert al.span_end.tolist() == [3, -1]  # " cat" is spelt by teacher tokens 2..3
    assert al.coverage == 1.0
    # the other way round: teacher-as-student
    al = align_spans(teacher, student)
    assert al.anchor.tolist() == [-1, 0, -1, 1]
    assert al.span_end.tolist() == [
        -1,
        -1,
        -1,
        -1,
    ]  # "th" -> "e": "e" ends where student 0 ends, but "th" has no anchor
    assert al.coverage == 0.5


def test_byte_pieces_of_one_character_anchor_only_after_the_last():
    # "é!" : student splits é into two byte tokens that both report span (0, 1)
    student = [(0, 1), (0, 1), (1, 2)]
    teacher = [(0, 1), (1, 2)]
    al = align_spans(student, teacher)
    assert al.anchor.tolist() == [-1, 0, 1]
    assert al.span_end.tolist() == [-1, 1, -1]


def test_whitespace_runs_and_trimmed_offsets():
    # "a  b": a tokenizer that trims the space off "Ġb" reports (3, 4); ends are what count
    student = [(0, 1), (1, 2), (3, 4)]  # a | Ġ | Ġb (trimmed)
    teacher = [(0, 1), (1, 3), (3, 4)]  # a | ĠĠ | b
    al = align_spans(student, teacher)
    assert al.anchor.tolist() == [0, -1, 2]


def test_identity_alignment_equals_self_alignment(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = "naïve  café\n\n日本語 text\twith   runs"
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    al = align_spans(enc["offset_mapping"], enc["offset_mapping"])
    ident = identity_alignment(len(enc["input_ids"]))
    # multi-byte characters split into byte tokens anchor only after their last piece
    pieces_ok = al.anchor >= 0
    assert torch.equal(al.anchor[pieces_ok], ident.anchor[pieces_ok])
    assert pieces_ok.float().mean() > 0.7
    ascii_text = "the cat sat  on\nthe mat"
    enc = tok(ascii_text, add_special_tokens=False, return_offsets_mapping=True)
    al = align_spans(enc["offset_mapping"], enc["offset_mapping"])
    ident = identity_alignment(len(enc["input_ids"]))
    assert torch.equal(al.anchor, ident.anchor) and torch.equal(al.span_end, ident.span_end)


@pytest.mark.parametrize(
    "text", ["Élan vital: naïve café, 日本語!", "tabs\tand   spaces\n\nnew lines", "plain words here"]
)
def test_anchors_share_the_prefix_text(corpus, tmp_path, text):
    """Real tokenizers of different sizes: every anchor joins equal prefixes, every span spells the token."""
    from transformers import AutoTokenizer

    small = AutoTokenizer.from_pretrained(train_tokenizer(corpus, tmp_path / "s", 280))
    big = AutoTokenizer.from_pretrained(train_tokenizer(corpus, tmp_path / "b", 700))
    for s_tok, t_tok in ((small, big), (big, small)):
        s = s_tok(text, add_special_tokens=False, return_offsets_mapping=True)
        t = t_tok(text, add_special_tokens=False, return_offsets_mapping=True)
        al = align_spans(s["offset_mapping"], t["offset_mapping"])
        assert (al.anchor >= 0).any()
        for i, (a, e) in enumerate(zip(al.anchor.tolist(), al.span_end.tolist(), strict=True)):
            if a >= 0:
                assert s_tok.decode(s["input_ids"][: i + 1]) == t_tok.decode(t["input_ids"][: a + 1])
            if e >= 0:
                assert s_tok.decode(s["input_ids"][i + 1 : i + 2]) == t_tok.decode(
                    t["input_ids"][a + 1 : e + 1]
                )
        # the last token of the text always ends on a shared boundary
        assert al.anchor[-1] == len(t["input_ids"]) - 1


def test_span_logprob_is_the_chain_rule():
    lp = torch.tensor([[-0.5, -1.0, -2.0, -0.25, 0.0]])
    anchor = torch.tensor([[0, 1, -1]])
    span_end = torch.tensor([[3, 2, -1]])
    out = span_logprob(lp, anchor, span_end)
    assert out[0, 0].item() == pytest.approx(-0.5 - 1.0 - 2.0)
    assert out[0, 1].item() == pytest.approx(-1.0)
    assert math.isnan(out[0, 2].item())


def _lp(x):
    return torch.log_softmax(x, -1)


def test_project_with_targets():
    torch.manual_seed(0)
    s, t = _lp(torch.randn(4, 6)), _lp(torch.randn(4, 9))
    vmap = torch.tensor([0, 3, -1, 5, 7, -1])
    targets = torch.tensor([1, 2, 4, 5])
    nan = float("nan")
    # no finite target log-prob: exactly the plain projection
    none = project_with_targets(s, t, vmap, targets, torch.full((4,), nan))
    base = project_to_shared_support(s, t, vmap)
    assert all(torch.equal(a, b) for a, b in zip(none, base, strict=True))
    chain = torch.tensor([-1.5, -2.0, nan, -0.7])
    ps, pt = project_with_targets(s, t, vmap, targets, chain)
    assert ps.shape == pt.shape == (4, 4 + 2)  # 4 mapped ids, the own-target bucket, the tail
    assert torch.allclose(ps.exp().sum(-1), torch.ones(4), atol=1e-6)
    assert torch.allclose(pt.exp().sum(-1), torch.ones(4), atol=1e-6)
    # row 0: mapped target (student 1 -> bucket 1): teacher bucket gets p(map) + p_chain, then renormalized
    raw = t[0, 3].exp() + math.exp(-1.5)
    z = t[0, [0, 3, 5, 7]].exp().sum() + math.exp(-1.5) + (1 - t[0, [0, 3, 5, 7]].exp().sum())
    assert pt[0, 1].exp().item() == pytest.approx((raw / z).item(), rel=1e-5)
    assert ps[0, 4].item() == float("-inf")  # no own bucket for a mapped target
    # row 1: unmapped target (student 2): its own bucket, q(y) moved out of the student's tail
    assert ps[1, 4].item() == pytest.approx(s[1, 2].item(), rel=1e-5)
    assert ps[1, 5].exp().item() == pytest.approx(s[1, 5].exp().item(), rel=1e-4)
    # row 2: NaN → the plain projection for that row
    assert torch.allclose(ps[2, [0, 1, 2, 3, 5]], base[0][2], atol=1e-6)
    assert torch.allclose(pt[2, [0, 1, 2, 3, 5]], base[1][2], atol=1e-6)


@pytest.mark.parametrize("sparse", [None, "topk_tail"])
def test_fused_cross_vocab_equals_reference(sparse):
    """Fused + vocab map + KD mask + chain-rule targets == the per-position reference on full logits."""
    torch.manual_seed(1)
    n, hs, ht, vs, vt = 12, 8, 10, 11, 17
    hidden = torch.randn(n, hs, requires_grad=True)
    w = torch.randn(vs, hs, requires_grad=True)
    th, tw = torch.randn(n, ht), torch.randn(vt, ht)
    vmap = torch.tensor([0, 2, -1, 4, 5, -1, 9, 11, 12, -1, 16])
    labels = torch.randint(0, vs, (n,))
    kd_mask = torch.rand(n) > 0.3
    chain = torch.where(torch.rand(n) > 0.5, -torch.rand(n) * 3, torch.full((n,), float("nan")))
    T, alpha = 2.0, 0.6
    k = 20 if sparse else 64  # top-k = the whole shared support: equal to the dense divergence
    out = fused_linear_divergence(
        hidden,
        w,
        th,
        tw,
        "fkl",
        temperature=T,
        chunk_size=5,
        labels=labels,
        alpha=alpha,
        vocab_map=vmap,
        kd_mask=kd_mask,
        target_logprob=chain,
        reduction="sum",
        sparse=sparse,
        top_k=k,
    )
    out.loss.backward()
    g_fused = hidden.grad.clone(), w.grad.clone()
    hidden.grad = w.grad = None
    logits = hidden @ w.T
    spec = KDSpec("fkl", T)
    kd = kd_per_position(logits, th @ tw.T, spec, vocab_map=vmap, targets=labels, target_logprob=chain / 1.0)
    kd_ref = (kd * kd_mask).sum() * T**2
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    ref = alpha * kd_ref + torch.where(kd_mask, (1 - alpha) * ce, ce).sum()  # full CE where KD is masked
    ref.backward()
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(g_fused[0], hidden.grad, atol=1e-5)
    assert torch.allclose(g_fused[1], w.grad, atol=1e-5)


def test_many_to_one_projection_sums_teacher_tokens_by_student_prefix():
    from sakd.losses.vocab_map import project_many_to_one

    torch.manual_seed(0)
    s, t = _lp(torch.randn(3, 5)), _lp(torch.randn(3, 7))
    t2s = torch.tensor([0, 0, 1, 2, -1, 4, 4])  # teacher 0,1 begin with student 0; 5,6 with 4; 4 with none
    ps, pt = project_many_to_one(s, t, t2s)
    p = t.exp()
    want = torch.stack([p[:, 0] + p[:, 1], p[:, 2], p[:, 3], p[:, 5] + p[:, 6], p[:, 4]], -1)
    assert torch.allclose(pt.exp(), want, atol=1e-6)  # student 3 receives nothing: in the tail with teacher 4
    assert torch.allclose(ps.exp()[:, :4], s.exp()[:, [0, 1, 2, 4]], atol=1e-6)
    # a one-to-one map gives exactly the injective projection
    vmap = torch.tensor([0, 2, -1, 3, 5])
    inv = torch.full((7,), -1)
    inv[vmap[vmap >= 0]] = torch.nonzero(vmap >= 0).squeeze(-1)
    for a, b in zip(project_many_to_one(s, t, inv), project_to_shared_support(s, t, vmap), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_first_piece_map(corpus, tmp_path):
    from transformers import AutoTokenizer

    from sakd.align import build_vocab_map, first_piece_map, token_bytes

    small = AutoTokenizer.from_pretrained(train_tokenizer(corpus, tmp_path / "s", 280))
    big = AutoTokenizer.from_pretrained(train_tokenizer(corpus, tmp_path / "b", 700))
    vmap = build_vocab_map(small, big)
    t2s = first_piece_map(small, big, vmap)
    sb, tb = token_bytes(small), token_bytes(big)
    exact = vmap.teacher_to_student >= 0
    assert torch.equal(t2s[exact], vmap.teacher_to_student[exact])
    longer = 0
    for v in range(len(tb)):
        if t2s[v] >= 0 and tb[v] is not None:  # (special tokens map by role)
            assert tb[v].startswith(sb[t2s[v]])
            longer += len(tb[v]) > len(sb[t2s[v]])
            # the longest such prefix
            assert not any(
                b and len(b) > len(sb[t2s[v]]) and tb[v].startswith(b) for b in sb if b is not None
            )
    assert longer > 0 and (t2s >= 0).float().mean() > 0.9
