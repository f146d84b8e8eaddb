"""The training objective: ``alpha * [T^2] * D(teacher || student) + (1 - alpha) * CE``, summed over the
valid next-token positions of a micro-batch (the trainer normalizes by the global token count).

Student and teacher arrive as final hidden states + output heads (:class:`HiddenAndHead`); with
``fused`` (default) the loss goes through :func:`sakd.losses.fused_linear_divergence`, which never
builds ``[batch, seq, vocab]`` logits.  This class is the seam where cross-tokenizer alignment,
router weights and auxiliary losses plug in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from sakd.config import LossConfig
from sakd.losses import cross_entropy, divergence, fused_linear_divergence
from sakd.models.forward import HiddenAndHead

IGNORE_INDEX = -100


@dataclass
class ObjectiveOutput:
    loss_sum: torch.Tensor  # differentiable sum over valid tokens
    component_sums: dict[str, torch.Tensor]  # detached sums: loss, kd, ce
    num_tokens: int


class Objective:
    def __init__(self, cfg: LossConfig, *, vocab_size: int) -> None:
        self.cfg = cfg
        self.vocab_size = vocab_size

    @staticmethod
    def valid_mask(labels: torch.Tensor) -> torch.Tensor:
        """Positions whose next token is a target: ``labels[:, 1:] != -100``."""
        return labels[:, 1:] != IGNORE_INDEX

    def _chunked_ce(
        self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
    ) -> torch.Tensor:
        """Summed CE, ``chunk_size`` rows of logits at a time; each chunk is recomputed in backward
        (activation checkpointing), so peak extra memory is O(chunk x V), not O(N x V)."""

        def chunk_ce(
            h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, t: torch.Tensor
        ) -> torch.Tensor:
            return cross_entropy(
                nn.functional.linear(h, w, b),
                t,
                ignore_index=IGNORE_INDEX,
                label_smoothing=self.cfg.label_smoothing,
                reduction="sum",
            )

        total = hidden.new_zeros((), dtype=torch.float32)
        step = self.cfg.chunk_size
        for lo in range(0, hidden.shape[0], step):
            h, t = hidden[lo : lo + step], targets[lo : lo + step]
            if torch.is_grad_enabled() and hidden.requires_grad:
                total = total + checkpoint(chunk_ce, h, weight, bias, t, use_reentrant=False)
            else:
                total = total + chunk_ce(h, weight, bias, t)
        return total

    def __call__(
        self,
        student: HiddenAndHead,
        teacher: HiddenAndHead | None,
        labels: torch.Tensor,
        *,
        temperature: float,
    ) -> ObjectiveOutput:
        cfg, V = self.cfg, self.vocab_size
        targets = labels[:, 1:].reshape(-1)
        mask = targets != IGNORE_INDEX
        s_hidden = student.hidden[:, :-1].reshape(-1, student.hidden.shape[-1])
        s_w = student.head_weight[:V]
        s_b = None if student.head_bias is None else student.head_bias[:V]
        n = int(mask.sum())
        if teacher is None or cfg.alpha == 0:
            ce = self._chunked_ce(s_hidden, s_w, s_b, targets)
            d = ce.detach()
            return ObjectiveOutput(ce, {"loss": d, "ce": d}, n)
        t_hidden = teacher.hidden[:, :-1].reshape(-1, teacher.hidden.shape[-1])
        t_w = teacher.head_weight[:V]
        t_b = None if teacher.head_bias is None else teacher.head_bias[:V]
        if cfg.fused:
            res = fused_linear_divergence(
                s_hidden,
                s_w,
                t_hidden,
                t_w,
                cfg.kind,
                temperature=temperature,
                chunk_size=cfg.chunk_size,
                mask=mask,
                beta=cfg.beta,
                skew=cfg.skew,
                labels=targets,
                alpha=cfg.alpha,
                label_smoothing=cfg.label_smoothing,
                ignore_index=IGNORE_INDEX,
                scale_by_t2=cfg.scale_by_t2,
                reduction="sum",
                student_head_bias=s_b,
                teacher_head_bias=t_b,
                sparse=None if cfg.sparse == "none" else cfg.sparse,
                top_k=cfg.kd_top_k or 1,
                num_samples=cfg.num_samples,
            )
            return ObjectiveOutput(res.loss, {"loss": res.loss.detach(), "kd": res.kd, "ce": res.ce}, n)
        s_logits = nn.functional.linear(s_hidden, s_w, s_b)
        with torch.no_grad():
            t_logits = nn.functional.linear(t_hidden, t_w, t_b)
        kd = divergence(
            s_logits,
            t_logits,
            cfg.kind,
            temperature=temperature,
            beta=cfg.beta,
            skew=cfg.skew,
            mask=mask,
            reduction="sum",
            scale_by_t2=cfg.scale_by_t2,
        )
        ce = cross_entropy(
            s_logits, targets, ignore_index=IGNORE_INDEX, label_smoothing=cfg.label_smoothing, reduction="sum"
        )
        loss = cfg.alpha * kd + (1 - cfg.alpha) * ce
        return ObjectiveOutput(loss, {"loss": loss.detach(), "kd": kd.detach(), "ce": ce.detach()}, n)
