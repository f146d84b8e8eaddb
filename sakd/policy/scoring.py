"""What the held-out scoring of a student's own answers shares between text (:mod:`sakd.policy.continuations`)
and conversations (:mod:`sakd.policy.chat_eval`): the decoding modes, the prompts' settings and the
teacher's negative log-likelihood of what was written."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from sakd.losses import Head, over_chunks
from sakd.models.forward import hidden_and_head
from sakd.policy.sampling import Sampling

ROLE_EVAL = 3
MODES = ("greedy", "sampled")


@dataclass(frozen=True)
class ContinuationSpec:
    """Held-out prompts (student token ids) and how to continue them; ``prefixes``: for conversations, the
    prompt messages of each (:mod:`sakd.policy.chat_eval`)."""

    prompts: list[list[int]]
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8
    prefixes: list[list[dict]] | None = None

    def sampling(self, mode: str) -> Sampling:
        return Sampling(self.max_new_tokens, self.temperature, self.top_p, greedy=mode == "greedy")


def teacher_nll(teacher: Any, views: list[tuple[list[int], int, int]], vocab: int, device: Any) -> float:
    """Sum over rows of the teacher's NLL (T = 1) of its tokens from each row's ``first`` on."""
    width = max(len(v[0]) for v in views)
    ids = torch.zeros((len(views), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    scored = torch.zeros((len(views), width), dtype=torch.bool)  # position j scores token j + 1
    for i, (t_ids, first, _) in enumerate(views):
        ids[i, : len(t_ids)] = torch.as_tensor(t_ids)
        mask[i, : len(t_ids)] = 1
        scored[i, max(first, 1) - 1 : len(t_ids) - 1] = True
    out = hidden_and_head(teacher, teacher, ids.to(device), mask.to(device))
    head = Head(out.head_weight, out.head_bias, vocab)
    hidden = out.hidden.reshape(-1, out.hidden.shape[-1])
    nxt = torch.cat([ids[:, 1:], ids[:, :1]], 1).reshape(-1).to(device)

    def chunk(r: slice) -> torch.Tensor:
        lp = torch.log_softmax(head.logits(hidden[r], upcast=True), dim=-1)
        return lp.gather(1, nxt[r, None]).squeeze(1)

    lp = over_chunks(chunk, hidden.shape[0], 256, combine="cat").reshape(ids.shape)
    return float(-(lp.double() * scored.to(device)).sum())


def summarise(sums: torch.Tensor, n: int, accelerator: Any, world: int) -> dict[str, float]:
    """``cont_*`` from per-mode sums ``[len(MODES), 3]`` (teacher NLL, answer tokens, answer bytes), summed over
    ranks: nats per answer token, bits per answer byte, mean answer length over the ``n`` prompts."""
    if accelerator is not None and world > 1:
        sums = accelerator.reduce(sums.to(accelerator.device), reduction="sum").cpu()
    out: dict[str, float] = {"cont_prompts": float(n)}
    for k, mode in enumerate(MODES):
        nll, tokens, n_bytes = sums[k].tolist()
        out[f"cont_{mode}_teacher_nll"] = nll / max(tokens, 1.0)
        out[f"cont_{mode}_teacher_bpb"] = nll / math.log(2) / max(n_bytes, 1.0)
        out[f"cont_{mode}_tokens"] = tokens / max(n, 1)
    return out
