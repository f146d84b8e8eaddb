"""Pairing two tokenizers before training: identical ones give plain KD; different ones a vocabulary
map (cached per tokenizer pair), the many-to-one teacher -> student projection, and the coverage figures
the run prints and records."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sakd.align.vocab import first_piece_map, load_or_build_vocab_map
from sakd.config import AlignmentConfig
from sakd.errors import SetupError

log = logging.getLogger(__name__)


@dataclass
class Alignment:
    teacher_tokenizer: Any = None
    differ: bool = False  # the tokenizers' vocabularies differ
    aligned: bool = False  # batches carry teacher tokens and a position alignment
    vocab_map: torch.Tensor | None = None  # student id -> teacher id (-1: none); None when identical
    teacher_to_student: torch.Tensor | None = None  # teacher id -> longest student-token prefix
    stats: dict[str, Any] = field(default_factory=dict)


def setup_alignment(
    acfg: AlignmentConfig,
    student_tok: Any,
    teacher_tok: Any,
    accelerator: Any,
    *,
    own_templates: bool = False,
) -> Alignment:
    """Plain KD for identical tokenizers; a cached vocab map and text-aligned positions for different
    ones (and with ``alignment.mode=always``). ``own_templates`` (conversations, each model rendering with its
    own chat template): two tokenizers with one vocabulary but different templates read different texts, so
    their positions are aligned too (else the teacher would read the student's template)."""
    differ = teacher_tok is not student_tok and teacher_tok.get_vocab() != student_tok.get_vocab()
    templates_differ = own_templates and getattr(teacher_tok, "chat_template", None) != getattr(
        student_tok, "chat_template", None
    )
    aligned = differ or acfg.mode == "always" or templates_differ
    out = Alignment(teacher_tokenizer=teacher_tok, differ=differ, aligned=aligned)
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
        raise SetupError(
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
