"""The models and tokenizers on-policy distillation generates and scores with, as a run built them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Models:
    """What generates and scores: the prepared student (and its ZeRO stage), the teacher and its placement,
    both tokenizers (``teacher_tokenizer`` None when batches carry no teacher tokens: one
    vocabulary, no alignment)."""

    student: Any
    zero_stage: int
    teacher: Any
    teacher_placement: str | None
    student_tokenizer: Any
    teacher_tokenizer: Any | None

    @classmethod
    def of_run(cls, run: Any) -> Models:
        """From a built run (:class:`sakd.training.trainer.Distiller`'s attributes; this layer sits below it)."""
        al = run.alignment
        return cls(
            run.student,
            run.zero_stage,
            run.teacher,
            run.teacher_placement,
            run.tokenizer,
            al.teacher_tokenizer if al.aligned else None,
        )
