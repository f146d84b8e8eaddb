"""How the teacher is paired with the student, before training starts.

* :func:`setup_alignment` -- identical tokenizers give plain KD; different ones a vocabulary map (cached
  per tokenizer pair) and text-aligned positions in every batch;
* :func:`load_teacher` -- the frozen teacher, replicated on every process or partitioned by its own
  ZeRO-3 engine (see :mod:`sakd.distributed`);
* :func:`build_aux` -- the trainable projections of the feature / attention / contrastive losses.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sakd.align import first_piece_map, load_or_build_vocab_map
from sakd.config import AlignmentConfig, DistillationConfig, ModelConfig
from sakd.distributed import built_whole, teacher_engine, zero_stage
from sakd.losses.auxiliary import AuxiliaryHeads, layer_pairs
from sakd.models import freeze, load_model
from sakd.models.capture import enable_selective_attention
from sakd.rundir import RunDirError

log = logging.getLogger(__name__)


@dataclass
class Alignment:
    teacher_tokenizer: Any = None
    differ: bool = False  # the tokenizers' vocabularies differ
    aligned: bool = False  # batches carry teacher tokens and a position alignment
    vocab_map: torch.Tensor | None = None  # student id -> teacher id (-1: none); None when identical
    teacher_to_student: torch.Tensor | None = None  # teacher id -> longest student-token prefix
    stats: dict[str, Any] = field(default_factory=dict)


def setup_alignment(acfg: AlignmentConfig, student_tok: Any, teacher_tok: Any, accelerator: Any) -> Alignment:
    """Plain KD for identical tokenizers; a cached vocab map and text-aligned positions for different
    ones (and with ``alignment.mode=always``)."""
    differ = teacher_tok is not student_tok and teacher_tok.get_vocab() != student_tok.get_vocab()
    out = Alignment(teacher_tokenizer=teacher_tok, differ=differ, aligned=differ or acfg.mode == "always")
    if not differ:
        n = len(student_tok)
        if out.aligned:
            out.stats = {
                "student_vocab": n,
                "teacher_vocab": n,
                "mapped": n,
                "student_coverage": 1.0,
                "teacher_vocab_coverage": 1.0,
            }
        return out
    cache = acfg.cache_dir or str(
        Path(os.environ.get("SAKD_CACHE_DIR", Path.home() / ".cache" / "sakd")) / "vocab_maps"
    )
    with accelerator.main_process_first():
        vmap, cached = load_or_build_vocab_map(student_tok, teacher_tok, cache)
    mapped = vmap.student_to_teacher >= 0
    mapped[[i for i in student_tok.all_special_ids if i < len(mapped)]] = False  # EOS/pad map by role
    if not bool(mapped.any()):
        raise RunDirError(
            "no alignment possible: no student token (specials aside) has a teacher token with the same text; "
            "check model.tokenizer and model.teacher_tokenizer"
        )
    stats = vmap.stats()
    if stats["student_coverage"] < 0.5:
        log.warning(
            "only %.1f%% of the student's tokens have a teacher token with the same text: the KD signal will be "
            "weak (check model.teacher_tokenizer)",
            100 * stats["student_coverage"],
        )
    out.stats = {**stats, "vocab_map_cached": cached}
    if not vmap.is_identity():
        out.vocab_map = vmap.student_to_teacher.to(accelerator.device)
        t2s = first_piece_map(student_tok, teacher_tok, vmap)
        out.teacher_to_student = t2s.to(accelerator.device)
        out.stats["teacher_vocab_with_student_prefix"] = float((t2s >= 0).float().mean())
    return out


def load_teacher(
    mcfg: ModelConfig, tokenizer: Any, accelerator: Any, ds_config: dict[str, Any] | None, *, seed: int
) -> tuple[Any, str]:
    """The frozen teacher and its placement (``replicated`` or ``zero3``, see model.teacher_placement)."""
    placement = mcfg.teacher_placement
    if placement == "auto":
        placement = "zero3" if zero_stage(ds_config) == 3 else "replicated"
    if placement == "zero3" and mcfg.teacher_quantization != "none":
        raise RunDirError(
            "model.teacher_quantization needs model.teacher_placement=replicated (a bitsandbytes-quantized "
            "teacher cannot be partitioned by ZeRO-3)"
        )
    with built_whole(accelerator):
        teacher = load_model(
            mcfg.teacher,
            tokenizer=tokenizer,
            dtype=mcfg.teacher_dtype,
            trust_remote_code=mcfg.trust_remote_code,
            seed=seed,
            attn_implementation=mcfg.attn_implementation,
            quantization=mcfg.teacher_quantization,
            device=accelerator.device,
        )
    t_rows = teacher.get_output_embeddings().weight.shape[0]
    if t_rows < len(tokenizer):
        raise RunDirError(
            f"teacher has {t_rows} output rows but its tokenizer has {len(tokenizer)} tokens; "
            "set model.teacher_tokenizer to the teacher's own tokenizer"
        )
    freeze(teacher)
    if placement == "zero3":
        return teacher_engine(teacher, ds_config or {}, offload=mcfg.teacher_offload), placement
    if mcfg.teacher_quantization == "none":  # bitsandbytes already placed a quantized one
        teacher = teacher.to(accelerator.device)
    return teacher, placement


def build_aux(
    d: DistillationConfig, student: torch.nn.Module, teacher: Any, tokenizers_differ: bool
) -> tuple[AuxiliaryHeads | None, list[tuple[int, int]]]:
    """The projections of the auxiliary losses (None when no auxiliary loss is on) and the (student,
    teacher) attention layer pairs; the paired layers' attention is switched to the recording kernel."""
    attention_pairs: list[tuple[int, int]] = []
    if teacher is None or not (d.feature.weight or d.attention.weight or d.contrastive.weight):
        return None, attention_pairs
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
                raise RunDirError(
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
    return (aux if any(p.numel() for p in aux.parameters()) else None), attention_pairs
