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
from typing import Any

import torch

from sakd.config import DistillationConfig, LossConfig
from sakd.losses import (
    BlockDraws,
    HeadInput,
    KDSpec,
    ObjectiveSpec,
    Targets,
    VocabBridge,
    cross_entropy,
    distill_loss,
    fused_distill,
    fused_linear_cross_entropy,
    over_chunks,
    resolve_chunk_size,
)
from sakd.models.forward import HiddenAndHead, hidden_and_head
from sakd.models.zero import is_partitioned
from sakd.objective.aux_terms import AuxTerms
from sakd.objective.kd_rows import KDRows, live_kd_rows, stored_kd_rows, student_rows
from sakd.teacher.capabilities import LIVE, Capabilities
from sakd.teacher.signal import StoredSignal, TeacherOutput

IGNORE_INDEX = -100


@dataclass
class ObjectiveOutput:
    loss_sum: torch.Tensor  # differentiable sum over valid tokens
    component_sums: dict[str, torch.Tensor]  # detached sums: loss, kd, ce, aux terms
    num_tokens: torch.Tensor  # int64 count of the predicted positions (a tensor: no host sync)


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
    aux: the auxiliary terms (:mod:`sakd.objective.terms`), or None.
    seed: the seed of the on-the-fly ``sparse=sampled`` draws, per (seed, block) as a cache's.
    teacher: what the run's teacher signal gives (a live teacher's states and head, or a stored
        distribution): the one thing the KD rows are built differently for.
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
        seed: int = 0,
        teacher: Capabilities = LIVE,
    ) -> None:
        self.cfg, self.seed, self.teacher = cfg, seed, teacher
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

    def student_loss(
        self,
        student: torch.nn.Module,
        batch: dict[str, torch.Tensor],
        teacher: TeacherOutput | None,
        *,
        temperature: float,
        **objective_kwargs: Any,
    ) -> ObjectiveOutput:
        """The student's forward (final hidden states and head, plus the internals the auxiliary terms
        compare) and the objective of one micro-batch: what a trainer runs inside the prepared module's
        forward (``sakd distill`` and :class:`sakd.integrations.DistillationTrainer` alike);
        ``objective_kwargs``: the token router's KD weights and the curriculum's multipliers."""
        aux = self.aux
        out = hidden_and_head(
            student,
            student,
            batch["input_ids"],
            batch.get("attention_mask"),
            hidden_layers=aux.student_layers if aux else [],
            attention_layers=aux.student_attention if aux else [],
        )
        return self(out, teacher, batch["labels"], temperature=temperature, batch=batch, **objective_kwargs)

    @staticmethod
    def valid_mask(labels: torch.Tensor) -> torch.Tensor:
        """Positions whose next token is a target: ``labels[:, 1:] != -100``."""
        return labels[:, 1:] != IGNORE_INDEX

    def __call__(
        self,
        student: HiddenAndHead,
        teacher: TeacherOutput | None,
        labels: torch.Tensor,
        *,
        temperature: float,
        batch: dict[str, torch.Tensor] | None = None,
        kd_weights: torch.Tensor | None = None,
        multipliers: dict[str, float] | None = None,
    ) -> ObjectiveOutput:
        """The summed objective of one micro-batch.

        ``batch`` carries what the auxiliary terms and cross-tokenizer KD need: ``anchor`` and
        ``span_end`` ``[B, Ls]``, ``teacher_input_ids`` / ``teacher_attention_mask`` ``[B, Lt]``, and
        ``attention_mask``. ``kd_weights`` ``[B·(Ls-1)]`` are the token router's per-token KD weights;
        ``multipliers`` the curriculum's per-component factors (kd, ce, feature, ...; absent = 1).
        """
        batch = batch or {}
        targets = labels[:, 1:].reshape(-1)
        n = (targets != IGNORE_INDEX).sum()
        if teacher is None or self.cfg.alpha == 0:
            out = self._ce_only(student, targets, n)
            if multipliers and multipliers.get("ce", 1.0) != 1.0:
                out.loss_sum = out.loss_sum * multipliers["ce"]
                out.component_sums["loss"] = out.loss_sum.detach()
        else:
            out = self._distill(
                student, teacher, targets, n, temperature, batch, kd_weights, multipliers or {}
            )
        if teacher is None or self.aux is None:
            return out
        predicted = predicted_positions(labels, batch.get("attention_mask"))
        loss, sums = self.aux.add_to(
            student, teacher, batch, predicted, out.loss_sum, out.component_sums, multipliers
        )
        return ObjectiveOutput(loss, sums, n)

    def _ce_only(self, student: HiddenAndHead, targets: torch.Tensor, n: torch.Tensor) -> ObjectiveOutput:
        """Summed CE, one chunk of logits at a time (:func:`_summed_ce`)."""
        ce = _summed_ce(student_rows(student, self.vocab_size), targets, self.cfg)
        ce = ce.float() if ce.dtype != torch.float64 else ce
        d = ce.detach()
        return ObjectiveOutput(ce, {"loss": d, "ce": d}, n)

    def kd_rows(
        self,
        student: HiddenAndHead,
        teacher: TeacherOutput,
        targets: torch.Tensor,
        batch: dict[str, torch.Tensor],
        temperature: float | None = None,
    ) -> KDRows:
        """The rows the KD term of this micro-batch is taken on (see :class:`KDRows`); ``targets`` are the
        flat student targets ``labels[:, 1:]``. With ``temperature`` (and the chain rule on, across
        tokenizers) a live teacher also scores each multi-token target's text at it."""
        bridge = self.bridge
        if bridge.teacher_to_student is not None:  # the many-to-one projection replaces the 1:1 map
            bridge = VocabBridge(teacher_to_student=bridge.teacher_to_student)
        chain = self.dcfg.alignment.chain_rule and self.bridge.crosses
        if not self.teacher.live:  # the stored distribution at each student position (already at its anchor)
            stored: StoredSignal = teacher  # type: ignore[assignment]
            return stored_kd_rows(student_rows(student, self.vocab_size), stored, bridge, targets, chain)
        live: HiddenAndHead = teacher  # type: ignore[assignment]
        return live_kd_rows(
            student_rows(student, self.vocab_size),
            live,
            bridge,
            targets,
            batch,
            cfg=self.cfg,
            chain=chain,
            temperature=temperature,
            head_vocab=self.teacher_vocab_size if self.bridge.crosses else self.vocab_size,
            teacher_vocab_size=self.teacher_vocab_size,
        )

    def _distill(
        self,
        student: HiddenAndHead,
        teacher: TeacherOutput,
        targets: torch.Tensor,
        n: torch.Tensor,
        temperature: float,
        batch: dict[str, torch.Tensor],
        kd_weights: torch.Tensor | None,
        multipliers: dict[str, float],
    ) -> ObjectiveOutput:
        rows = self.kd_rows(student, teacher, targets, batch, temperature)
        spec = self.spec.at_temperature(temperature)
        if self.bridge.crosses and self.dcfg.alignment.uld_weight:
            spec = _with_uld(spec, self.dcfg.alignment.uld_weight)
        scale, ce_alone = 1.0, 1.0
        if multipliers:  # the curriculum: KD and CE scaled apart (alpha', an outer scale, CE-only rows)
            spec, scale, ce_alone = _scaled_blend(spec, multipliers)
        student_rows, t_rows, kd_mask = rows.student, rows.teacher, rows.kd_mask
        positions = Targets(
            labels=targets,
            kd_mask=kd_mask,
            target_logprob=rows.target_logprob,
            kd_weights=kd_weights,
            ce_weight_without_kd=ce_alone,
        )
        draws = _sampled_draws(spec, batch, self.seed) if self.teacher.live else None
        fused = rows.anchor is not None or kd_weights is not None or rows.mixture or draws
        if self.cfg.fused or fused or not self.teacher.live:
            if not self.cfg.fused:  # the fused function, as one chunk: it alone takes these inputs
                spec = _with_chunk(spec, max(1, student_rows.hidden.shape[0]))
            res = fused_distill(student_rows, t_rows, spec, positions, rows.bridge, draws=draws)
        else:
            s_logits = student_rows.head.logits(student_rows.hidden)
            with torch.no_grad():
                t_logits = t_rows.head.logits(t_rows.hidden)
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
        loss = res.loss if scale == 1.0 else res.loss * scale
        sums = {"loss": loss.detach(), "kd": res.kd, "ce": res.ce}
        if kd_mask is not None:
            sums["kd_positions"] = (kd_mask & (targets != IGNORE_INDEX)).sum().double()
        return ObjectiveOutput(loss, sums, n)


def _summed_ce(rows: HeadInput, targets: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """Σ CE over ``rows``. Training: the fused loss with its gradient in closed form
    (:func:`sakd.losses.fused_ce.fused_linear_cross_entropy`; computed in the forward, so a ZeRO-3 head is needed
    only while it is gathered); evaluation and ``loss.fused: false``: autograd over the chunks."""
    n_rows, width = rows.hidden.shape
    vocab = rows.head.vocab or rows.head.weight.shape[0]
    chunk = resolve_chunk_size(cfg.chunk_size, n_rows, (vocab, 0), (width, 0))
    trains = torch.is_grad_enabled() and (rows.hidden.requires_grad or rows.head.weight.requires_grad)
    if trains and cfg.fused:
        return fused_linear_cross_entropy(
            rows.hidden,
            rows.head,
            targets,
            ignore_index=IGNORE_INDEX,
            label_smoothing=cfg.label_smoothing,
            chunk_size=chunk,
        )

    def chunk_ce(r: slice) -> torch.Tensor:
        return cross_entropy(
            rows.head.logits(rows.hidden[r]),
            targets[r],
            ignore_index=IGNORE_INDEX,
            label_smoothing=cfg.label_smoothing,
            reduction="sum",
        )

    # logits rebuilt in backward (``loss.fused: false``), except for a ZeRO-3 head: it is not gathered again for
    # a recomputation in backward, so the chunks' logits are kept
    return over_chunks(chunk_ce, n_rows, chunk, recompute=trains and not is_partitioned(rows.head.weight))


def _sampled_draws(spec: ObjectiveSpec, batch: dict[str, torch.Tensor], seed: int) -> BlockDraws | None:
    """``sparse=sampled``: each position drawn from its block's stream (:mod:`sakd.losses.draws`), the same
    however the step is split into chunks, micro-batches and ranks."""
    if spec.kd.sparse != "sampled" or "sample_ids" not in batch:
        return None
    return BlockDraws(seed, batch["sample_ids"].reshape(-1))


def _scaled_blend(spec: ObjectiveSpec, multipliers: dict[str, float]) -> tuple[ObjectiveSpec, float, float]:
    """``alpha·m_kd·KD + (1-alpha)·m_ce·CE`` as ``scale·[alpha'·KD + (1-alpha')·CE]``, and CE's share of the
    weight where KD has no anchor (CE alone counts there, at ``m_ce``: ``m_ce / scale`` inside the scale).
    That share weighs the loss only; the ``ce`` the objective reports (and the balancer reads) stays the plain
    CE, so a multiplier never feeds back into the magnitude it was computed from."""
    import dataclasses

    m_ce = multipliers.get("ce", 1.0)
    kd = spec.alpha * multipliers.get("kd", 1.0)
    ce = (1.0 - spec.alpha) * m_ce
    scale = kd + ce
    if scale <= 0:
        return spec, 0.0, 1.0
    return dataclasses.replace(spec, alpha=min(max(kd / scale, 0.0), 1.0)), scale, m_ce / scale


def _with_uld(spec: ObjectiveSpec, weight: float) -> ObjectiveSpec:
    import dataclasses

    return dataclasses.replace(spec, kd=dataclasses.replace(spec.kd, uld_weight=weight))


def _with_chunk(spec: ObjectiveSpec, chunk_size: int) -> ObjectiveSpec:
    import dataclasses

    return dataclasses.replace(spec, chunk_size=chunk_size)


__all__ = ["IGNORE_INDEX", "KDRows", "Objective", "ObjectiveOutput", "objective_spec", "predicted_positions"]
