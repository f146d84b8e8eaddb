"""From one teacher forward (final hidden states + output head) to the stored signal of its blocks, a
chunk of rows of logits at a time (never ``[batch, block, vocab]`` at once).

Each position keeps, at the cache temperature T (``log_softmax(z / T)`` of the teacher's logits z over
its tokenizer's ids): ``topk`` -- the k best ids and their log-probs; ``topk_tail`` -- plus the log of the
remaining mass, summed in float32 from the full distribution (exact, not ``1 − Σ`` of rounded values);
``sampled`` -- ``num_samples`` ids drawn with replacement from the distribution, each distinct id once with
its count (Anshumann et al., 2025, "Sparse Logit Sampling": unbiased). Every position also keeps the
teacher's log-prob of its own next token (the chain rule across tokenizers needs it) and, optionally,
the router's probabilities.

The draws of block ``i`` come from a generator seeded with ``(seed, i)`` and a fixed chunk of rows
(:mod:`sakd.losses.draws`, shared with the on-the-fly ``sampled`` mode), so a block's draws do not depend on
which rank or batch processed it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sakd.losses import Head, sample_teacher
from sakd.losses.draws import ROWS_PER_CHUNK, block_generator
from sakd.losses.sparse import logsumexp_or_neginf
from sakd.models.forward import HiddenAndHead
from sakd.teacher.cache.manifest import SignalSpec
from sakd.teacher.cache.shardfile import BlockSignal


def _rows(lp: Tensor, spec: SignalSpec, generator: torch.Generator | None) -> dict[str, Tensor]:
    """The stored fields of ``[c, V]`` tempered log-probs."""
    if spec.mode == "sampled":
        s = sample_teacher(lp, int(spec.num_samples), temperature=1.0, generator=generator)
        return {"indices": s.indices, "logprobs": s.logprobs, "counts": s.counts}
    values, indices = lp.topk(int(spec.top_k), dim=-1)
    out = {"indices": indices, "logprobs": values}
    if spec.mode == "topk_tail":
        out["tail"] = logsumexp_or_neginf(lp.scatter(-1, indices, float("-inf")))
    return out


@torch.no_grad()
def block_signals(out: HiddenAndHead, blocks: dict[str, Tensor], spec: SignalSpec) -> list[BlockSignal]:
    """The :class:`BlockSignal` of each sequence of one teacher forward.

    ``blocks``: the batch of :func:`~sakd.teacher.cache.blocks.token_blocks` rows as tensors
    (``input_ids`` / ``char_end`` ``[b, L]``, ``char_base`` / ``follows_previous`` / ``next_id`` /
    ``block_index`` ``[b]``).
    """
    head = Head(out.head_weight, out.head_bias, spec.vocab_size)
    ids = blocks["input_ids"]
    b, n = ids.shape
    router = None
    if spec.router_shape is not None and out.router is not None:
        router = torch.stack(out.router.reshape(b, n), dim=2)  # [b, L, layers, experts]
    signals = []
    for i in range(b):
        index = int(blocks["block_index"][i])
        nxt = torch.cat([ids[i, 1:], blocks["next_id"][i].reshape(1).to(ids.device)])
        gen = block_generator(spec.seed or 0, index, ids.device) if spec.mode == "sampled" else None
        parts: list[dict[str, Tensor]] = []
        for lo in range(0, n, ROWS_PER_CHUNK):
            hi = min(lo + ROWS_PER_CHUNK, n)
            lp = torch.log_softmax(head.logits(out.hidden[i, lo:hi], upcast=True) / spec.temperature, dim=-1)
            fields = _rows(lp, spec, gen)
            own = lp.gather(-1, nxt[lo:hi].clamp_min(0).unsqueeze(-1)).squeeze(-1)
            fields["next_logprob"] = torch.where(nxt[lo:hi] >= 0, own, float("nan"))
            parts.append(fields)
        cat = {k: torch.cat([p[k] for p in parts]).cpu() for k in parts[0]}
        signals.append(
            BlockSignal(
                index=index,
                token_ids=ids[i].cpu(),
                char_base=int(blocks["char_base"][i]),
                char_end=blocks["char_end"][i].cpu(),
                follows_previous=bool(blocks["follows_previous"][i]),
                next_logprob=cat["next_logprob"],
                indices=cat["indices"],
                logprobs=cat["logprobs"],
                counts=cat.get("counts"),
                tail=cat.get("tail"),
                router=None if router is None else router[i].float().cpu(),
            )
        )
    return signals
