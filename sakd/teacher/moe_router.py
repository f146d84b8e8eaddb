"""The Student-Aware Router (SAR) of Kim, Chu & Yang 2025 ("Every Expert Matters", arXiv 2502.12947, §4.3,
Algorithm 2): the MoE teacher routes every token to *all* its experts, and its router is trained by the
student's feedback while every other teacher weight stays frozen. Each optimizer step, before the student's
micro-batches, the router takes one step on (paper Eq. 9)

    L_SAR = KL(p_T || q_S) + beta * sum_layers CV(P)^2      [+ gamma * KL(g_orig || g), sakd's option]

``p_T`` is the teacher's next-token distribution through the learned router (the gradient flows through it),
``q_S`` the student's (no gradient), both at the KD temperature and, across tokenizers, at the anchors on the
student's vocabulary; ``P`` is the mean gate probability of each expert over a micro-batch's tokens.

**Why it cannot collapse.** The experts are frozen and every expert sees every token, so the classic MoE
collapse (unchosen experts get no gradient, the chosen ones improve and get chosen more) has no mechanism
here. What can happen is that the router learns to send each token to one expert (the paper's CV(P)^2 only
balances the batch *means*, which one-expert-per-token routing can satisfy) -- measured in the research
prototype at larger learning rates. sakd therefore parameterises the learned router as the original plus a
bounded logit offset: ``z = z_orig + rho * tanh((h @ D^T) / rho)`` (``router_max_logit_shift`` = rho, ``D``
the trained offset weights, zero at start). For every token and layer each expert's gate is then at least
``exp(-2 rho)`` times its original gate (KL(g_orig || g) <= 2 rho): collapse is impossible by construction,
whatever the learning rate or the number of steps. ``rho = None`` gives the paper's unbounded router.

The offsets live in this module, outside the teacher: the teacher's own tensors are never written, so a
teacher partitioned by ZeRO-3 stays as it is; the offsets (``E x H`` per layer, tiny) are replicated on
every rank and kept identical by all-reducing their gradients before each update; they and their AdamW
state are saved in every checkpoint (``sar_router.safetensors``, ``sar_optimizer.pt``) apart from the
student, and never exported.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from sakd.config import MoEConfig
from sakd.errors import CheckpointError
from sakd.losses import HeadInput, KDSpec, VocabBridge, kd_per_position, over_chunks, resolve_chunk_size
from sakd.teacher.moe import RoutingSpec, require_moe

SAR_WEIGHTS = "sar_router.safetensors"
SAR_OPTIMIZER = "sar_optimizer.pt"
Reduce = Callable[[torch.Tensor, str], torch.Tensor]


def cv_squared(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Llama-MoE's balance statistic (the paper's Eq. 6): unbiased variance over the squared mean."""
    return x.var() / (x.mean() ** 2 + eps)


@dataclass
class RouterTerms:
    """The regularisers of one micro-batch's router forward, and its detached per-layer statistics
    (sums over the micro-batch's real tokens, ``[layers]`` each)."""

    balance: torch.Tensor  # sum over layers of CV(P)^2 (differentiable)
    anchor_sum: torch.Tensor  # sum over tokens of the layer-mean KL(g_orig || g) (differentiable)
    drift: torch.Tensor  # per layer: sum over tokens of KL(g_orig || g)
    entropy: torch.Tensor  # per layer: sum over tokens of the gate entropy / log E
    max_gate: torch.Tensor  # per layer: sum over tokens of the largest gate
    tokens: int


def router_terms(recorded: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor) -> RouterTerms:
    """The balance and anchor terms from what the routing hooks recorded (router logits and the logits
    routed with, ``[T, E]`` per layer) over the real tokens ``mask`` ``[T]``."""
    balance, anchor, drift, entropy, max_gate = [], [], [], [], []
    for original, routed in recorded:
        logp = torch.log_softmax(routed[mask].float(), dim=-1)
        logp0 = torch.log_softmax(original[mask].float(), dim=-1).detach()
        gates = logp.exp()
        kl = (logp0.exp() * (logp0 - logp)).sum(-1)
        balance.append(cv_squared(gates.mean(0)) if len(gates) else gates.new_zeros(()))
        anchor.append(kl.sum())
        with torch.no_grad():
            drift.append(kl.sum())
            entropy.append(-(gates * logp).sum(-1).sum() / math.log(gates.shape[-1]))
            max_gate.append(gates.max(-1).values.sum())
    return RouterTerms(
        balance=torch.stack(balance).sum(),
        anchor_sum=torch.stack(anchor).sum() / len(anchor),
        drift=torch.stack(drift),
        entropy=torch.stack(entropy),
        max_gate=torch.stack(max_gate),
        tokens=int(mask.sum()),
    )


def router_kd_sum(
    student: HeadInput,
    teacher: HeadInput,
    valid: torch.Tensor,
    temperature: float,
    bridge: VocabBridge,
    chunk_size: int | str,
) -> torch.Tensor:
    """``sum over valid rows of KL(p_T || q_S)`` with the gradient flowing into the teacher's hidden states
    only, one chunk of logits at a time (recomputed in backward: O(chunk x V) memory; ``chunk_size``: rows,
    or ``auto``)."""
    spec = KDSpec(kind="fkl", temperature=temperature)  # fkl is KL(teacher || student): Eq. 9's order
    s_hidden = student.hidden.detach()

    def chunk(rows: slice) -> torch.Tensor:
        with torch.no_grad():
            s_logits = student.head.logits(s_hidden[rows], upcast=True)
        kd = kd_per_position(
            s_logits,
            teacher.head.logits(teacher.hidden[rows], upcast=True),
            spec,
            vocab_map=bridge.vocab_map if bridge.teacher_to_student is None else None,
            teacher_to_student=bridge.teacher_to_student,
        )
        return torch.where(valid[rows], kd, 0.0).sum()

    rows = resolve_chunk_size(
        chunk_size,
        s_hidden.shape[0],
        (student.head.weight.shape[0], teacher.head.weight.shape[0]),
        (s_hidden.shape[-1], teacher.hidden.shape[-1]),
    )
    return over_chunks(chunk, s_hidden.shape[0], rows, recompute=torch.is_grad_enabled())


class StudentAwareRouter(nn.Module):
    """Trainable logit offsets for every router of an MoE teacher, with their own AdamW."""

    def __init__(self, teacher: nn.Module, cfg: MoEConfig, device: torch.device) -> None:
        super().__init__()
        found = require_moe(teacher, "distillation.moe.student_aware_router")
        self.cfg, self.rho = cfg, cfg.router_max_logit_shift
        self.offsets = nn.ParameterList(
            nn.Parameter(torch.zeros(r.num_experts, r.hidden_dim, device=device)) for r in found
        )
        self.optimizer = torch.optim.AdamW(
            self.offsets.parameters(), lr=cfg.router_lr, weight_decay=cfg.router_weight_decay
        )

    @property
    def num_layers(self) -> int:
        return len(self.offsets)

    def shift(self, layer: int, inputs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The logits to route with: the router's own plus the (bounded) learned offset; at zero offsets
        exactly the router's own."""
        delta = F.linear(inputs, self.offsets[layer].to(inputs.dtype))
        if self.rho is not None:
            delta = self.rho * torch.tanh(delta / self.rho)
        return logits + delta.to(logits.dtype)

    def routing(self, *, record: bool = False) -> RoutingSpec:
        """All experts, routed with the learned logits (what both SAR forwards use)."""
        return RoutingSpec("all", logit_offsets=self.shift, record=record)

    def update(self, reduce: Reduce) -> float:
        """After the step's router backward passes: sum the gradients over ranks (each rank's loss is
        already divided by the step's global token counts), clip, step; returns the pre-clip norm (the
        update is skipped on every rank alike when it is not finite)."""
        params = list(self.offsets.parameters())
        flat = torch.cat(
            [p.grad.reshape(-1) if p.grad is not None else torch.zeros_like(p).reshape(-1) for p in params]
        )
        flat = reduce(flat, "sum")
        for p, g in zip(params, flat.split([p.numel() for p in params]), strict=True):
            p.grad = g.reshape(p.shape).clone()
        max_norm = self.cfg.router_max_grad_norm
        norm = float(torch.nn.utils.clip_grad_norm_(params, math.inf if max_norm is None else max_norm))
        if math.isfinite(norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def save(self, directory: Path) -> None:
        save_file(
            {f"offset.{i}": p.detach().cpu().contiguous() for i, p in enumerate(self.offsets)},
            str(directory / SAR_WEIGHTS),
        )
        torch.save(self.optimizer.state_dict(), directory / SAR_OPTIMIZER)

    def load(self, directory: Path) -> None:
        """Restore the offsets and their optimizer (``weights_only``: a planted pickle is refused)."""
        try:
            tensors = load_file(str(directory / SAR_WEIGHTS))
            state = torch.load(directory / SAR_OPTIMIZER, weights_only=True, map_location="cpu")
        except (OSError, RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"cannot resume the student-aware router from {directory}: {first}"
            ) from None
        if len(tensors) != self.num_layers:
            raise CheckpointError(
                f"{directory / SAR_WEIGHTS} holds {len(tensors)} router layers, the teacher has {self.num_layers}"
            )
        with torch.no_grad():
            for i, p in enumerate(self.offsets):
                p.copy_(tensors[f"offset.{i}"])
        self.optimizer.load_state_dict(state)
