"""Forward passes that return final hidden states and the output head instead of full logits.

The KD and CE losses are computed from ``hidden @ head.T`` one chunk of tokens at a time, so a
``[batch, seq, vocab]`` logits tensor is never built.  The forward goes through the (possibly
DDP/DeepSpeed-wrapped) model itself — so distributed hooks run — with ``logits_to_keep=1`` so the
model computes logits for one position only.  Auxiliary losses ask for more: selected hidden
states, attention maps of selected layers, and (MoE teachers) the router's expert probabilities —
see :mod:`sakd.models.capture`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from sakd.models.capture import RouterSignal, capture
from sakd.upstream import zero3_gathered


@dataclass
class HiddenAndHead:
    hidden: torch.Tensor  # [B, L, H] final (normed) hidden states
    head_weight: torch.Tensor  # [V, H]
    head_bias: torch.Tensor | None  # [V] or None
    router: RouterSignal | None = None  # MoE: per layer [B*L, experts] probabilities + chosen experts
    layers: dict[int, torch.Tensor] = field(default_factory=dict)  # hidden_states[i] -> [B, L, H]
    attentions: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, heads, L, L]


def output_head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output head's weight and bias, whole.

    Under ZeRO-3 each rank holds a slice. Without gradients (the teacher, evaluation) the head is gathered
    and copied here. For training it must already be gathered, by registering it as an external parameter
    of the module whose forward computes the loss, so its gradient reaches ZeRO's own hooks.
    """
    head = model.get_output_embeddings()
    params = [head.weight, getattr(head, "bias", None)]
    if not any(p is not None and hasattr(p, "ds_id") for p in params):
        return params[0], params[1]
    training = torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params)
    if not any(p is not None and _sliced(p) for p in params):
        if training:
            return params[0], params[1]
        # without gradients a gathered ZeRO-3 head is copied: DeepSpeed may release it during the forward
        # that follows (by its recorded trace), which would leave a reference to an empty tensor
        return tuple(None if p is None else p.detach().clone() for p in params)
    if training:
        raise RuntimeError(
            "a trainable ZeRO-3 output head must be registered as an external parameter of the module "
            "whose forward computes the loss (sakd.models.zero.register_external_parameters)"
        )
    import deepspeed

    with deepspeed.zero.GatheredParameters([p for p in params if p is not None], modifier_rank=None):
        weight, bias = (None if p is None else p.detach().clone() for p in params)
    return weight, bias


def _sliced(param: torch.Tensor) -> bool:
    """A ZeRO-3 parameter that is partitioned right now (not gathered)."""
    return not zero3_gathered(param)


def hidden_and_head(
    model: nn.Module,
    unwrapped: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    router: bool = False,
    hidden_layers: Sequence[int] = (),
    attention_layers: Sequence[int] = (),
) -> HiddenAndHead:
    """Run ``model`` (wrapped or not; ``unwrapped`` is the bare HF model) and return hidden states + head.

    ``router`` asks an MoE model for its router probabilities (a dense model gives None);
    ``hidden_layers`` / ``attention_layers`` select internals for the auxiliary losses (attention
    layers must be enabled with :func:`sakd.models.capture.enable_selective_attention`).
    """
    weight, bias = output_head(unwrapped)
    got = capture(
        model,
        input_ids,
        attention_mask,
        hidden_layers=hidden_layers,
        attention_layers=attention_layers,
        router=router,
    )
    return HiddenAndHead(got.hidden, weight, bias, got.router, got.layers, got.attentions)
