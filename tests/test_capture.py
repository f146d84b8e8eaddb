"""Router / hidden-state / selective-attention capture on the tiny presets."""

from __future__ import annotations

import pytest
import torch

from sakd.models import load_model
from sakd.models.capture import (
    SELECTIVE_ATTENTION,
    capture,
    collect_attentions,
    enable_selective_attention,
    router_signal,
    router_top_k,
    select_hidden,
)


class _StubTokenizer:
    """What load_model reads off a tokenizer (avoids training one: keeps these tests fast)."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __len__(self) -> int:
        return 256


def _model(name: str, **kw):
    return load_model(name, tokenizer=_StubTokenizer(), seed=0, **kw)


def _batch(length: int = 12):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 256, (2, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding on the second row
    return ids, mask


@pytest.fixture(scope="module")
def moe():
    return _model("tiny-moe").eval()


@pytest.fixture(scope="module")
def dense():
    return _model("tiny-dense").eval()


def test_router_signal_matches_model_selection(moe):
    ids, mask = _batch()
    # Independent record of what each router hands to the experts: (logits, scores, indices).
    seen: list[torch.Tensor] = []
    routers = [m for m in moe.modules() if type(m).__name__.endswith("TopKRouter")]
    assert len(routers) == moe.config.num_hidden_layers
    hooks = [r.register_forward_hook(lambda _m, _a, out: seen.append(out[2])) for r in routers]
    try:
        with torch.no_grad():
            out = moe(input_ids=ids, attention_mask=mask, output_router_logits=True, use_cache=False)
    finally:
        for h in hooks:
            h.remove()

    k = router_top_k(moe.config)
    assert k == moe.config.num_experts_per_tok == 2
    # Router outputs are raw logits (rows do not sum to 1), one [B*L, E] per layer.
    assert not torch.allclose(out.router_logits[0].float().sum(-1), torch.ones(ids.numel()))
    sig = router_signal(out.router_logits, top_k=k, attention_mask=mask, batch_shape=ids.shape)
    assert sig.num_layers == 4 and sig.num_experts == 4
    for p, c, ref in zip(sig.probs, sig.chosen, seen, strict=True):
        assert p.shape == (ids.numel(), 4) and p.dtype == torch.float32
        torch.testing.assert_close(p.sum(-1), torch.ones(ids.numel()))
        assert c.shape == (ids.numel(), k) and c.dtype == torch.int64
        assert torch.equal(c, ref.to(torch.int64))
    assert [t.shape for t in sig.reshape()] == [(2, 12, 4)] * 4
    ent = sig.entropy()
    assert (
        ent[0].shape == (ids.numel(),)
        and (ent[0] >= 0).all()
        and (ent[0] <= torch.log(torch.tensor(4.0)) + 1e-6).all()
    )
    load = sig.load()
    assert load.shape == (4, 4)
    torch.testing.assert_close(load.sum(-1), torch.full((4,), float(k)))
    # load counts only real tokens: equals a direct count over the unpadded positions
    real = mask.reshape(-1).bool()
    direct = torch.stack(
        [torch.bincount(c[real].reshape(-1), minlength=4).float() / real.sum() for c in seen]
    )
    torch.testing.assert_close(load, direct)


def test_router_dense_is_none(dense):
    ids, mask = _batch()
    out = dense(input_ids=ids, attention_mask=mask, output_router_logits=True, use_cache=False)
    assert router_signal(getattr(out, "router_logits", None), top_k=2, attention_mask=mask) is None
    assert router_top_k(dense.config) is None
    assert capture(dense, ids, mask, router=True).router is None


def test_select_hidden_indices_and_final_norm(moe):
    ids, mask = _batch()
    raw_last: list[torch.Tensor] = []
    hook = moe.model.layers[-1].register_forward_hook(lambda _m, _a, out: raw_last.append(out))
    try:
        with torch.no_grad():
            out = moe(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    finally:
        hook.remove()
    hs = out.hidden_states
    assert len(hs) == moe.config.num_hidden_layers + 1
    sel = select_hidden(hs, [0, 2, -1])
    assert list(sel) == [0, 2, 4]
    torch.testing.assert_close(sel[0], moe.model.embed_tokens(ids))
    # transformers 5: the last entry is the final-normed hidden state, not the raw layer output.
    torch.testing.assert_close(sel[4], moe.model.norm(raw_last[0]))
    assert not torch.allclose(sel[4], raw_last[0])
    with pytest.raises(IndexError):
        select_hidden(hs, [5])

    c = capture(moe, ids, mask, hidden_layers=[0, 2], router=True)
    torch.testing.assert_close(c.hidden, hs[-1])
    assert set(c.layers) == {0, 2}
    torch.testing.assert_close(c.layers[2], hs[2])
    assert c.router is not None and c.router.num_layers == 4
    assert c.logits.shape[1] == 1  # logits_to_keep=1


@pytest.mark.parametrize("name,layers", [("tiny-moe", [1, 3]), ("tiny-dense", [0])])
def test_selective_attention_equals_eager(name, layers):
    ids, mask = _batch()
    real = mask.bool()
    sdpa = _model(name)
    eager = _model(name, attn_implementation="eager")
    assert sdpa.config._attn_implementation == "sdpa"
    with torch.no_grad():
        ref_logits = sdpa(input_ids=ids, attention_mask=mask, use_cache=False).logits
        full = eager(input_ids=ids, attention_mask=mask, output_attentions=True, use_cache=False)
        assert len(full.attentions) == sdpa.config.num_hidden_layers

        enable_selective_attention(sdpa, layers)
        assert sdpa.config._attn_implementation == SELECTIVE_ATTENTION
        assert eager.config._attn_implementation == "eager"
        out = sdpa(input_ids=ids, attention_mask=mask, output_attentions=True, use_cache=False)
    assert len(out.attentions) == len(layers)  # unselected layers record nothing
    got = collect_attentions(out, layers)
    assert list(got) == layers
    n_heads = sdpa.config.num_attention_heads
    for i in layers:
        assert got[i].shape == (2, n_heads, 12, 12)
        torch.testing.assert_close(got[i], full.attentions[i])
    # Logits unchanged on real tokens (padded query rows are undefined in any implementation).
    torch.testing.assert_close(out.logits[real], ref_logits[real])
    # The padding mask reaches the eager layers: no attention onto padded keys.
    assert got[layers[0]][1, :, 4:, :4].abs().max() == 0

    # Without padding SDPA uses is_causal (mask None): the eager layers must rebuild the causal mask.
    with torch.no_grad():
        out2 = sdpa(input_ids=ids, output_attentions=True, use_cache=False)
        full2 = eager(input_ids=ids, output_attentions=True, use_cache=False)
    for i, a in collect_attentions(out2, layers).items():
        torch.testing.assert_close(a, full2.attentions[i])
    c = capture(sdpa, ids, mask, attention_layers=layers[:1])
    torch.testing.assert_close(c.attentions[layers[0]], full.attentions[layers[0]])
    with pytest.raises(ValueError):
        capture(
            sdpa,
            ids,
            mask,
            attention_layers=[i for i in range(sdpa.config.num_hidden_layers) if i not in layers][:1],
        )


def test_student_gradients_flow_through_attention():
    ids, mask = _batch()
    student = _model("tiny-dense").train()
    enable_selective_attention(student, [1])
    c = capture(student, ids, mask, attention_layers=[1])
    att = c.attentions[1]
    assert att.requires_grad
    # A loss on the attention map alone reaches the selected layer's q/k projections ...
    (att[mask.bool()[:, None, :, None].expand_as(att)] ** 2).sum().backward()
    q_grad = student.model.layers[1].self_attn.q_proj.weight.grad
    assert q_grad is not None and q_grad.abs().sum() > 0
    # ... and earlier layers, but not the selected layer's value/output path.
    assert student.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    o_grad = student.model.layers[1].self_attn.o_proj.weight.grad
    assert o_grad is None or o_grad.abs().sum() == 0
