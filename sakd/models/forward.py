"""Forward passes that return final hidden states and the output head instead of full logits.

The KD and CE losses are computed from ``hidden @ head.T`` one chunk of tokens at a time, so a
``[batch, seq, vocab]`` logits tensor is never built.  The forward goes through the (possibly
DDP/DeepSpeed-wrapped) model itself — so distributed hooks run — with ``logits_to_keep=1`` so the
model computes logits for one position only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class HiddenAndHead:
    hidden: torch.Tensor  # [B, L, H] final (normed) hidden states
    head_weight: torch.Tensor  # [V, H]
    head_bias: torch.Tensor | None  # [V] or None
    router_logits: tuple[torch.Tensor, ...] | None = None  # MoE: per layer [B*L, E]


def output_head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def hidden_and_head(
    model: nn.Module,
    unwrapped: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    router_logits: bool = False,
) -> HiddenAndHead:
    """Run ``model`` (wrapped or not; ``unwrapped`` is the bare HF model) and return hidden states + head."""
    kwargs = {"output_router_logits": True} if router_logits else {}
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        output_hidden_states=True,
        logits_to_keep=1,
        use_cache=False,
        **kwargs,
    )
    weight, bias = output_head(unwrapped)
    return HiddenAndHead(out.hidden_states[-1], weight, bias, getattr(out, "router_logits", None))
