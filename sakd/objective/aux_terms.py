"""The auxiliary terms of the objective -- hidden-state features, attention maps, and a sequence-level
contrastive (InfoNCE) term -- added to the logit loss with their configured weights.

Normalisation, so that a weight means the same thing at any depth and however a step is split:

* feature and attention terms are summed over the **same predicted positions** as KD and CE (the
  trainer divides every sum by the step's global count of them) and **averaged over layer pairs**;
* the contrastive term is a mean over the sequences of the micro-batch, weighted by the micro-batch's
  predicted tokens. Its negatives are the other sequences *of the same micro-batch on the same rank*,
  so unlike every other term it depends on how a step is split into micro-batches and ranks
  (``training.batch_size`` sequences per micro-batch); a micro-batch of one sequence has no negatives,
  and the config refuses ``training.batch_size < 2`` with the term on. The run says so at start.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from sakd.align.positions import gather_at_anchors
from sakd.config import DistillationConfig
from sakd.errors import ConfigError
from sakd.models.capture import enable_selective_attention
from sakd.models.forward import HiddenAndHead
from sakd.objective.projections import AuxiliaryHeads, layer_pairs

log = logging.getLogger(__name__)

CONTRASTIVE_SPLIT_NOTE = (
    "distillation.contrastive: InfoNCE negatives are the other sequences of each micro-batch "
    "(training.batch_size per rank), so this term -- unlike the others -- changes with how a step is "
    "split into micro-batches and ranks"
)


@dataclass
class AuxTerms:
    """The weighted auxiliary terms of a run (built by :func:`sakd.objective.projections.build_aux`).

    ``heads`` holds the trainable projections; ``attention_pairs`` the (student, teacher) layers whose
    attention maps are matched.
    """

    dcfg: DistillationConfig
    heads: AuxiliaryHeads
    attention_pairs: list[tuple[int, int]] = field(default_factory=list)

    @property
    def feature_on(self) -> bool:
        return self.dcfg.feature.weight > 0 and bool(self.heads.feature_layers)

    @property
    def attention_on(self) -> bool:
        return (
            self.dcfg.attention.weight > 0
            and self.heads.attention_proj is not None
            and bool(self.attention_pairs)
        )

    @property
    def contrastive_on(self) -> bool:
        return self.dcfg.contrastive.weight > 0 and self.heads.contrastive_student is not None

    def __call__(
        self,
        student: HiddenAndHead,
        teacher: HiddenAndHead,
        batch: dict[str, torch.Tensor],
        predicted: torch.Tensor,
        loss: torch.Tensor,
        sums: dict[str, torch.Tensor],
        multipliers: dict[str, float] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``loss`` plus the weighted terms, and ``sums`` with each term's detached (unweighted) sum added.

        ``predicted``: ``[B, Ls]`` bool, the positions KD and CE are summed over; ``multipliers``: the
        curriculum's factor per term (absent: 1).
        """
        d, sums, mult = self.dcfg, dict(sums), multipliers or {}
        if self.feature_on:
            if "anchor" in batch:  # teacher states at each student position's anchor
                anchor = batch["anchor"]
                rows = predicted & (anchor >= 0)
                t_layers = {t: gather_at_anchors(layer, anchor) for t, layer in teacher.layers.items()}
            else:
                rows, t_layers = predicted, teacher.layers
            feat = self.heads.feature_losses(student.layers, t_layers, kind=d.feature.kind, mask=rows)
            loss = loss + d.feature.weight * mult.get("feature", 1.0) * feat
            sums["feature"] = feat.detach()
        if self.attention_on:
            att = sum(
                self.heads.attention_loss(student.attentions[s], teacher.attentions[t], predicted)
                for s, t in self.attention_pairs
            ) / len(self.attention_pairs)
            loss = loss + d.attention.weight * mult.get("attention", 1.0) * att
            sums["attention"] = att.detach()
        if self.contrastive_on:
            s_mask = batch.get("attention_mask")
            s_mask = torch.ones_like(predicted) if s_mask is None else s_mask.bool()
            t_mask = batch.get("teacher_attention_mask")
            t_mask = s_mask if t_mask is None else t_mask.bool()
            nce = self.heads.contrastive_loss(
                student.hidden, teacher.hidden, s_mask, t_mask, temperature=d.contrastive.temperature
            )
            # info_nce is a mean over sequences; weighted by this micro-batch's predicted tokens, the
            # trainer's division by the global token count gives a token-weighted mean
            nce_sum = nce * predicted.sum()
            loss = loss + d.contrastive.weight * mult.get("contrastive", 1.0) * nce_sum
            sums["contrastive"] = nce_sum.detach()
        sums["loss"] = loss.detach()
        return loss, sums


def build_aux_terms(
    d: DistillationConfig, student: torch.nn.Module, teacher: Any, tokenizers_differ: bool
) -> AuxTerms | None:
    """The auxiliary terms with their projections and (student, teacher) attention layer pairs, or None when
    no auxiliary term is on; the paired layers' attention is switched to the recording kernel."""
    attention_pairs: list[tuple[int, int]] = []
    if teacher is None or not (d.feature.weight or d.attention.weight or d.contrastive.weight):
        return None
    t_model = getattr(teacher, "module", teacher)  # a ZeRO-3 engine has a `config` of its own
    s_cfg, t_cfg = student.config, t_model.config
    pairs = (
        layer_pairs(t_cfg.num_hidden_layers, s_cfg.num_hidden_layers, d.feature.layer_map or "uniform")
        if d.feature.weight
        else []
    )
    attention = d.attention.weight > 0
    if attention and tokenizers_differ:
        log.warning(
            "distillation.attention is disabled: teacher and student tokenize differently, so their "
            "attention maps have different shapes and no one-to-one positions"
        )
        attention = False
    if attention:
        ls, lt = s_cfg.num_hidden_layers, t_cfg.num_hidden_layers
        for layer in d.attention.layers:
            s_layer = layer + ls if layer < 0 else layer
            if not 0 <= s_layer < ls:
                raise ConfigError(
                    f"distillation.attention.layers: student layer {layer} is out of range for {ls} layers"
                )
            attention_pairs.append((s_layer, max(0, round((s_layer + 1) * lt / ls) - 1)))
        enable_selective_attention(student, sorted({s for s, _ in attention_pairs}))
        enable_selective_attention(t_model, sorted({t for _, t in attention_pairs}))
    aux = AuxiliaryHeads(
        t_cfg.hidden_size,
        s_cfg.hidden_size,
        feature_layers=pairs,
        teacher_heads=t_cfg.num_attention_heads,
        student_heads=s_cfg.num_attention_heads,
        attention=attention,
        contrastive=d.contrastive.weight > 0,
    )
    if d.contrastive.weight > 0:
        log.warning(CONTRASTIVE_SPLIT_NOTE)
    if not any(p.numel() for p in aux.parameters()):
        return None
    return AuxTerms(d, aux, attention_pairs)
