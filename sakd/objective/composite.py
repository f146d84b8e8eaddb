"""The training objective: ``alpha * [T^2] * D(teacher || student) + (1 - alpha) * CE`` plus the
weighted auxiliary losses, summed over the valid next-token positions of a micro-batch (the
trainer normalizes by the global token count).

Student and teacher arrive as final hidden states + output heads (:class:`HiddenAndHead`); with
``fused`` (default) the loss goes through :func:`sakd.losses.fused_linear_divergence`, which never
builds ``[batch, seq, vocab]`` logits.

Across tokenizers (a batch with ``anchor`` / ``span_end``, see :mod:`sakd.align.positions`) the
teacher's hidden state at the anchor of each student position is gathered, the two vocabularies
meet through the vocab map (:mod:`sakd.losses.vocab_map`), the KD term counts only at anchored
positions (CE counts everywhere), and a student token the teacher spells with several tokens is
scored by the chain rule over them.  With identical tokenizers the aligned path gathers every
teacher position one-to-one and equals plain KD exactly (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from sakd.align.positions import span_logprob
from sakd.config import DistillationConfig, LossConfig
from sakd.losses import cross_entropy, divergence, fused_linear_divergence
from sakd.models.forward import HiddenAndHead
from sakd.objective.projections import AuxiliaryHeads

IGNORE_INDEX = -100


@dataclass
class ObjectiveOutput:
    loss_sum: torch.Tensor  # differentiable sum over valid tokens
    component_sums: dict[str, torch.Tensor]  # detached sums: loss, kd, ce
    num_tokens: int


class Objective:
    """Args:
    cfg: the KD/CE blend.
    vocab_size: student vocabulary (the tokenizer's length; head rows beyond it are ignored).
    teacher_vocab_size: the teacher's, when it has its own tokenizer.
    vocab_map: ``[vocab_size]`` student → teacher ids (-1 unmapped) for different tokenizers;
        None for identical ones.
    teacher_to_student: ``[teacher_vocab_size]`` many-to-one map (teacher token → the student token
        its text begins with); when given, the KD projection sums teacher probabilities through it.
    distillation: the whole section, for the alignment options and the auxiliary-loss weights.
    aux: the trainable projections of the auxiliary losses.
    attention_pairs: ``(student layer, teacher layer)`` attention maps to match.
    """

    def __init__(
        self,
        cfg: LossConfig,
        *,
        vocab_size: int,
        teacher_vocab_size: int | None = None,
        vocab_map: torch.Tensor | None = None,
        distillation: DistillationConfig | None = None,
        aux: AuxiliaryHeads | None = None,
        teacher_to_student: torch.Tensor | None = None,
        attention_pairs: list[tuple[int, int]] | None = None,
    ) -> None:
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.teacher_vocab_size = teacher_vocab_size or vocab_size
        if cfg.sparse in ("subset", "topk_tail") and cfg.kd_top_k and cfg.kd_top_k > self.teacher_vocab_size:
            raise ValueError(
                f"distillation.loss.kd_top_k={cfg.kd_top_k} is larger than the teacher's vocabulary "
                f"({self.teacher_vocab_size} tokens); lower it"
            )
        self.vocab_map = vocab_map
        self.teacher_to_student = teacher_to_student
        self.dcfg = distillation or DistillationConfig(loss=cfg)
        self.aux = aux
        self.attention_pairs = list(attention_pairs or [])

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

    def _teacher_token_logprobs(
        self, teacher: HiddenAndHead, teacher_ids: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        """``[B, Lt]``: log p_T(teacher token j+1 | prefix) at temperature T, chunk by chunk (no grad)."""
        vt = self.teacher_vocab_size
        w = teacher.head_weight[:vt]
        b = None if teacher.head_bias is None else teacher.head_bias[:vt]
        hidden = teacher.hidden.reshape(-1, teacher.hidden.shape[-1])
        nxt = torch.cat([teacher_ids[:, 1:], teacher_ids[:, -1:]], 1).reshape(-1)
        out = []
        with torch.no_grad():
            for lo in range(0, hidden.shape[0], self.cfg.chunk_size):
                logits = nn.functional.linear(hidden[lo : lo + self.cfg.chunk_size].float(), w.float(), b)
                lp = torch.log_softmax(logits / temperature, dim=-1)
                out.append(lp.gather(1, nxt[lo : lo + self.cfg.chunk_size, None]).squeeze(1))
        return torch.cat(out).reshape(teacher_ids.shape)

    def __call__(
        self,
        student: HiddenAndHead,
        teacher: HiddenAndHead | None,
        labels: torch.Tensor,
        *,
        temperature: float,
        batch: dict[str, torch.Tensor] | None = None,
    ) -> ObjectiveOutput:
        """The summed objective of one micro-batch.

        ``batch`` carries what the auxiliary losses and cross-tokenizer KD need: ``anchor`` and
        ``span_end`` ``[B, Ls]``, ``teacher_input_ids`` / ``teacher_attention_mask`` ``[B, Lt]``,
        and ``attention_mask``.
        """
        cfg, V = self.cfg, self.vocab_size
        batch = batch or {}
        targets = labels[:, 1:].reshape(-1)
        mask = targets != IGNORE_INDEX
        s_hidden = student.hidden[:, :-1].reshape(-1, student.hidden.shape[-1])
        s_w = student.head_weight[:V]
        s_b = None if student.head_bias is None else student.head_bias[:V]
        n = int(mask.sum())
        if teacher is None or cfg.alpha == 0:
            ce = self._chunked_ce(s_hidden, s_w, s_b, targets)
            d = ce.detach()
            out = ObjectiveOutput(ce, {"loss": d, "ce": d}, n)
            return self._add_aux(out, student, teacher, batch) if teacher is not None else out
        aligned = "anchor" in batch
        kd_mask = target_logprob = None
        vocab_map = self.vocab_map
        if aligned:
            anchor = batch["anchor"][:, :-1]
            kd_mask = (anchor >= 0).reshape(-1)
            index = anchor.clamp_min(0).unsqueeze(-1).expand(-1, -1, teacher.hidden.shape[-1])
            t_hidden = teacher.hidden.gather(1, index).reshape(-1, teacher.hidden.shape[-1])
            if self.dcfg.alignment.chain_rule and vocab_map is not None:
                span_end = batch["span_end"][:, :-1]
                multi = (span_end > anchor + 1) & (anchor >= 0)
                if bool(multi.any()):
                    tok_lp = self._teacher_token_logprobs(teacher, batch["teacher_input_ids"], temperature)
                    chain = span_logprob(tok_lp, anchor, torch.where(multi, span_end, -1))
                    target_logprob = chain.reshape(-1)
        else:
            t_hidden = teacher.hidden[:, :-1].reshape(-1, teacher.hidden.shape[-1])
        vt = self.teacher_vocab_size if vocab_map is not None else V
        t_w = teacher.head_weight[:vt]
        t_b = None if teacher.head_bias is None else teacher.head_bias[:vt]
        if cfg.fused or aligned:  # the aligned path always goes through the fused function
            res = fused_linear_divergence(
                s_hidden,
                s_w,
                t_hidden,
                t_w,
                cfg.kind,
                temperature=temperature,
                chunk_size=cfg.chunk_size if cfg.fused else max(1, s_hidden.shape[0]),
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
                vocab_map=None if self.teacher_to_student is not None else vocab_map,
                teacher_to_student=self.teacher_to_student if vocab_map is not None else None,
                kd_mask=kd_mask,
                target_logprob=target_logprob,
                uld_weight=self.dcfg.alignment.uld_weight if vocab_map is not None else 0.0,
            )
            sums = {"loss": res.loss.detach(), "kd": res.kd, "ce": res.ce}
            if aligned:
                sums["kd_positions"] = (kd_mask & mask).sum().double()
            return self._add_aux(ObjectiveOutput(res.loss, sums, n), student, teacher, batch)
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
        out = ObjectiveOutput(loss, {"loss": loss.detach(), "kd": kd.detach(), "ce": ce.detach()}, n)
        return self._add_aux(out, student, teacher, batch)

    def _add_aux(
        self,
        out: ObjectiveOutput,
        student: HiddenAndHead,
        teacher: HiddenAndHead,
        batch: dict[str, torch.Tensor],
    ) -> ObjectiveOutput:
        """Add the weighted feature / attention / contrastive losses (sums over tokens, like KD)."""
        d, aux = self.dcfg, self.aux
        if aux is None:
            return out
        loss, sums = out.loss_sum, dict(out.component_sums)
        s_mask = batch.get("attention_mask")
        s_mask = (
            torch.ones(student.hidden.shape[:2], dtype=torch.bool, device=student.hidden.device)
            if s_mask is None
            else s_mask.bool()
        )
        if d.feature.weight > 0 and aux.feature_layers:
            if "anchor" in batch:  # teacher states at each student position's anchor
                anchor = batch["anchor"]
                pos_mask = s_mask & (anchor >= 0)
                t_layers = {
                    t: layer.gather(1, anchor.clamp_min(0).unsqueeze(-1).expand(-1, -1, layer.shape[-1]))
                    for t, layer in teacher.layers.items()
                }
            else:
                pos_mask, t_layers = s_mask, teacher.layers
            feat = aux.feature_losses(student.layers, t_layers, kind=d.feature.kind, mask=pos_mask)
            loss = loss + d.feature.weight * feat
            sums["feature"] = feat.detach()
        if d.attention.weight > 0 and aux.attention_proj is not None and self.attention_pairs:
            att = sum(
                aux.attention_loss(student.attentions[s], teacher.attentions[t], s_mask)
                for s, t in self.attention_pairs
            )
            loss = loss + d.attention.weight * att
            sums["attention"] = att.detach()
        if d.contrastive.weight > 0 and aux.contrastive_student is not None:
            t_mask = batch.get("teacher_attention_mask")
            t_mask = s_mask if t_mask is None else t_mask.bool()
            nce = aux.contrastive_loss(
                student.hidden, teacher.hidden, s_mask, t_mask, temperature=d.contrastive.temperature
            )
            # info_nce is a mean over sequences; weight it by this micro-batch's tokens so that the
            # trainer's division by the global token count gives a token-weighted mean
            nce_sum = nce * out.num_tokens
            loss = loss + d.contrastive.weight * nce_sum
            sums["contrastive"] = nce_sum.detach()
        sums["loss"] = loss.detach()
        return ObjectiveOutput(loss, sums, out.num_tokens)
