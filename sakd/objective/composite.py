"""The training objective of one micro-batch: ``alpha·[T²·]D(teacher ‖ student) + (1 − alpha)·CE`` plus the
weighted auxiliary terms, each a **sum over the predicted positions** (the trainer divides by the step's
global count of them, so every term is a per-token mean however the step is split).

Student and teacher arrive as final hidden states + output heads (:class:`HiddenAndHead`); with
``fused`` (the default) the logit loss goes through :func:`sakd.losses.fused_distill`, which never
builds ``[batch, seq, vocab]`` logits; without it, through :func:`sakd.losses.distill_loss` on full
logits (a reference path; sparse modes apply on both).

Across tokenizers (a batch with ``anchor`` / ``span_end``, see :mod:`sakd.align.positions`) the
teacher's hidden state at the anchor of each student position is gathered, the two vocabularies meet
through the :class:`~sakd.losses.VocabBridge`, the KD term counts only at anchored positions (CE counts
everywhere and takes the whole weight where KD cannot), and a student token the teacher spells with
several tokens is scored by the chain rule over them. With identical tokenizers the aligned path gathers
every teacher position one-to-one and equals plain KD exactly (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sakd.align.positions import gather_at_anchors, span_logprob
from sakd.config import DistillationConfig, LossConfig
from sakd.losses import (
    Head,
    HeadInput,
    KDSpec,
    ObjectiveSpec,
    Targets,
    VocabBridge,
    cross_entropy,
    distill_loss,
    fused_distill,
    over_chunks,
)
from sakd.models.forward import HiddenAndHead
from sakd.models.zero import is_partitioned
from sakd.objective.aux_terms import AuxTerms

IGNORE_INDEX = -100


@dataclass
class ObjectiveOutput:
    loss_sum: torch.Tensor  # differentiable sum over valid tokens
    component_sums: dict[str, torch.Tensor]  # detached sums: loss, kd, ce, aux terms
    num_tokens: int


def objective_spec(cfg: LossConfig) -> ObjectiveSpec:
    """The logit loss the ``distillation.loss`` section describes (built once per run)."""
    return ObjectiveSpec(
        kd=KDSpec(
            kind=cfg.kind,
            temperature=cfg.temperature,
            beta=cfg.beta,
            skew=cfg.skew,
            sparse=None if cfg.sparse == "none" else cfg.sparse,
            top_k=cfg.kd_top_k or 1,
            num_samples=cfg.num_samples,
        ),
        alpha=cfg.alpha,
        label_smoothing=cfg.label_smoothing,
        scale_by_t2=cfg.scale_by_t2,
        chunk_size=cfg.chunk_size,
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def predicted_positions(labels: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, L]`` bool: positions whose next token is a target (``labels[:, 1:] != -100``; the last
    position predicts nothing). Every term of the objective is summed over exactly these."""
    out = torch.zeros_like(labels, dtype=torch.bool)
    out[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return out if attention_mask is None else out & attention_mask.bool()


class Objective:
    """Args:
    cfg: the KD/CE blend (``distillation.loss``).
    vocab_size: student vocabulary (the tokenizer's length; head rows beyond it are ignored).
    teacher_vocab_size: the teacher's, when it has its own tokenizer.
    bridge: the vocabulary map(s) for different tokenizers (empty for identical ones).
    distillation: the whole section, for the alignment options.
    aux: the auxiliary terms (feature / attention / contrastive), or None.
    """

    def __init__(
        self,
        cfg: LossConfig,
        *,
        vocab_size: int,
        teacher_vocab_size: int | None = None,
        bridge: VocabBridge | None = None,
        distillation: DistillationConfig | None = None,
        aux: AuxTerms | None = None,
    ) -> None:
        self.cfg = cfg
        self.spec = objective_spec(cfg)
        self.vocab_size = vocab_size
        self.teacher_vocab_size = teacher_vocab_size or vocab_size
        if cfg.sparse in ("subset", "topk_tail") and cfg.kd_top_k and cfg.kd_top_k > self.teacher_vocab_size:
            raise ValueError(
                f"distillation.loss.kd_top_k={cfg.kd_top_k} is larger than the teacher's vocabulary "
                f"({self.teacher_vocab_size} tokens); lower it"
            )
        self.bridge = bridge or VocabBridge()
        self.dcfg = distillation or DistillationConfig(loss=cfg)
        self.aux = aux

    @staticmethod
    def valid_mask(labels: torch.Tensor) -> torch.Tensor:
        """Positions whose next token is a target: ``labels[:, 1:] != -100``."""
        return labels[:, 1:] != IGNORE_INDEX

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

        ``batch`` carries what the auxiliary terms and cross-tokenizer KD need: ``anchor`` and
        ``span_end`` ``[B, Ls]``, ``teacher_input_ids`` / ``teacher_attention_mask`` ``[B, Lt]``, and
        ``attention_mask``.
        """
        batch = batch or {}
        targets = labels[:, 1:].reshape(-1)
        n = int((targets != IGNORE_INDEX).sum())
        if teacher is None or self.cfg.alpha == 0:
            out = self._ce_only(student, targets, n)
        else:
            out = self._distill(student, teacher, targets, n, temperature, batch)
        if teacher is None or self.aux is None:
            return out
        predicted = predicted_positions(labels, batch.get("attention_mask"))
        loss, sums = self.aux(student, teacher, batch, predicted, out.loss_sum, out.component_sums)
        return ObjectiveOutput(loss, sums, n)

    def _student_rows(self, student: HiddenAndHead) -> HeadInput:
        hidden = student.hidden[:, :-1].reshape(-1, student.hidden.shape[-1])
        return HeadInput(hidden, Head(student.head_weight, student.head_bias, self.vocab_size))

    def _ce_only(self, student: HiddenAndHead, targets: torch.Tensor, n: int) -> ObjectiveOutput:
        """Summed CE, one chunk of logits at a time (recomputed in backward: O(chunk x V) extra memory)."""
        rows = self._student_rows(student)

        def chunk_ce(r: slice) -> torch.Tensor:
            return cross_entropy(
                rows.head.logits(rows.hidden[r]),
                targets[r],
                ignore_index=IGNORE_INDEX,
                label_smoothing=self.cfg.label_smoothing,
                reduction="sum",
            )

        # a ZeRO-3 head is released after the forward and not gathered again for a recomputation in backward
        # (the prepared module returns no tensors DeepSpeed could hook): keep the chunks' logits instead
        recompute = (
            torch.is_grad_enabled() and rows.hidden.requires_grad and not is_partitioned(rows.head.weight)
        )
        ce = over_chunks(chunk_ce, rows.hidden.shape[0], self.cfg.chunk_size, recompute=recompute)
        ce = ce.float() if ce.dtype != torch.float64 else ce
        d = ce.detach()
        return ObjectiveOutput(ce, {"loss": d, "ce": d}, n)

    def _teacher_token_logprobs(
        self, teacher: HiddenAndHead, teacher_ids: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        """``[B, Lt]``: log p_T(teacher token j+1 | prefix) at temperature T, chunk by chunk (no grad)."""
        head = Head(teacher.head_weight, teacher.head_bias, self.teacher_vocab_size)
        hidden = teacher.hidden.reshape(-1, teacher.hidden.shape[-1])
        nxt = torch.cat([teacher_ids[:, 1:], teacher_ids[:, -1:]], 1).reshape(-1)

        def chunk(r: slice) -> torch.Tensor:
            lp = torch.log_softmax(head.logits(hidden[r], upcast=True) / temperature, dim=-1)
            return lp.gather(1, nxt[r, None]).squeeze(1)

        with torch.no_grad():
            return over_chunks(chunk, hidden.shape[0], self.cfg.chunk_size, combine="cat").reshape(
                teacher_ids.shape
            )

    def _distill(
        self,
        student: HiddenAndHead,
        teacher: HiddenAndHead,
        targets: torch.Tensor,
        n: int,
        temperature: float,
        batch: dict[str, torch.Tensor],
    ) -> ObjectiveOutput:
        aligned = "anchor" in batch
        crosses = self.bridge.crosses
        kd_mask = target_logprob = None
        if aligned:
            anchor = batch["anchor"][:, :-1]
            kd_mask = (anchor >= 0).reshape(-1)
            t_hidden = gather_at_anchors(teacher.hidden, anchor).reshape(-1, teacher.hidden.shape[-1])
            if self.dcfg.alignment.chain_rule and crosses:
                span_end = batch["span_end"][:, :-1]
                multi = (span_end > anchor + 1) & (anchor >= 0)
                if bool(multi.any()):
                    tok_lp = self._teacher_token_logprobs(teacher, batch["teacher_input_ids"], temperature)
                    target_logprob = span_logprob(tok_lp, anchor, torch.where(multi, span_end, -1)).reshape(
                        -1
                    )
        else:
            t_hidden = teacher.hidden[:, :-1].reshape(-1, teacher.hidden.shape[-1])
        spec = self.spec.at_temperature(temperature)
        if crosses and self.dcfg.alignment.uld_weight:
            spec = _with_uld(spec, self.dcfg.alignment.uld_weight)
        bridge = self.bridge
        if bridge.teacher_to_student is not None:  # the many-to-one projection replaces the 1:1 map
            bridge = VocabBridge(teacher_to_student=bridge.teacher_to_student)
        student_rows = self._student_rows(student)
        teacher_head = Head(
            teacher.head_weight, teacher.head_bias, self.teacher_vocab_size if crosses else self.vocab_size
        )
        positions = Targets(labels=targets, kd_mask=kd_mask, target_logprob=target_logprob)
        if self.cfg.fused or aligned:  # the aligned path always goes through the fused function
            if not self.cfg.fused:
                spec = _with_chunk(spec, max(1, student_rows.hidden.shape[0]))
            res = fused_distill(student_rows, HeadInput(t_hidden, teacher_head), spec, positions, bridge)
        else:
            s_logits = student_rows.head.logits(student_rows.hidden)
            with torch.no_grad():
                t_logits = teacher_head.logits(t_hidden)
            res = distill_loss(
                s_logits,
                t_logits,
                targets,
                spec=spec.kd,
                alpha=spec.alpha,
                ignore_index=IGNORE_INDEX,
                label_smoothing=spec.label_smoothing,
                scale_by_t2=spec.scale_by_t2,
                reduction="sum",
            )
        sums = {"loss": res.loss.detach(), "kd": res.kd, "ce": res.ce}
        if aligned:
            sums["kd_positions"] = (kd_mask & (targets != IGNORE_INDEX)).sum().double()
        return ObjectiveOutput(res.loss, sums, n)


def _with_uld(spec: ObjectiveSpec, weight: float) -> ObjectiveSpec:
    import dataclasses

    return dataclasses.replace(spec, kd=dataclasses.replace(spec.kd, uld_weight=weight))


def _with_chunk(spec: ObjectiveSpec, chunk_size: int) -> ObjectiveSpec:
    import dataclasses

    return dataclasses.replace(spec, chunk_size=chunk_size)


__all__ = ["IGNORE_INDEX", "Objective", "ObjectiveOutput", "objective_spec", "predicted_positions"]
