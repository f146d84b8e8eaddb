"""The teacher signal of a :class:`~sakd.integrations.DistillationTrainer`: its checked ``distillation``
section (:func:`open_section`), the one signal (:func:`trainer_signal`: the teacher model's, a cache's or
the caller's), and the signals that read each batch's block ids (``sample_ids``, from the rows'
``sample_id`` column through :class:`~sakd.integrations.DistillationCollator`):

* **Knowledge Augmentation** (``distillation.moe.augment_samples``): every block's expert draws come from
  a generator seeded by (``TrainingArguments.seed``, the Trainer's global step, the block's id, the sample
  index) -- :func:`sakd.teacher.moe.block_generators`, the seeds ``sakd distill`` uses with
  ``training.seed``, its step and its sample ids;
* **an offline teacher cache** (``distillation.teacher_cache``, written by ``sakd cache-teacher``): the
  cache's own blocks, read by block id (:class:`sakd.teacher.signal.CachedTeacher`), when the student
  reads the cache's blocks (the cache's tokenizer and block size, the rows of
  :func:`~sakd.integrations.prepare_distillation_data` on the cache's documents).

The ids travel with the rows, so whatever order the Trainer's sampler draws them in -- and after
``resume_from_checkpoint`` -- each block meets its own draws and its own cached signal.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import datasets
import torch
from torch import nn

from sakd.align.setup import Alignment
from sakd.config import ConfigError, DistillationConfig, RunConfig, load_config
from sakd.errors import DataError
from sakd.integrations.data import SAMPLE_ID
from sakd.objective.aux_terms import AuxTerms
from sakd.objective.compose import check_composition
from sakd.teacher.cache.attach import open_teacher_cache
from sakd.teacher.cache.fingerprint import tokenizer_sha256
from sakd.teacher.cache.reader import CacheReader
from sakd.teacher.capabilities import LIVE
from sakd.teacher.moe_router import StudentAwareRouter
from sakd.teacher.signal import CachedTeacher, TeacherOutput, TeacherSignal
from sakd.training.builders import build_teacher_signal

log = logging.getLogger(__name__)


def open_cache(distillation: DistillationConfig) -> tuple[CacheReader, DistillationConfig]:
    """The reader of ``distillation.teacher_cache`` once every shard verifies, and the section with
    ``loss.sparse`` resolved for it (a copy, as ``sakd distill`` resolves it)."""
    reader, cfg, notes = open_teacher_cache(RunConfig(distillation=distillation))
    for note in notes:
        log.info(note)
    return reader, cfg.distillation


def cache_signal(
    reader: CacheReader, distillation: DistillationConfig, train: Any, tokenizer: Any, device: torch.device
) -> CachedTeacher:
    """The cached teacher signal, after checking that the student reads the cache's own blocks: the
    cache's tokenizer, its block size, block ids it holds, and the first row's tokens."""
    root = reader.root
    if distillation.alignment.mode != "auto":
        raise ConfigError(
            f"DistillationTrainer reads a teacher cache only as the cache's own blocks; distillation.alignment."
            f"mode={distillation.alignment.mode} needs `sakd distill`"
        )
    if tokenizer is not None and tokenizer_sha256(tokenizer) != reader.manifest["tokenizer"]["sha256"]:
        raise ConfigError(
            f"the student's tokenizer (processing_class) differs from teacher cache {root}'s; DistillationTrainer "
            "reads a cache only with its own tokenizer (across tokenizers use `sakd distill`)"
        )
    if isinstance(train, datasets.Dataset) and len(train):  # other datasets: each batch is checked alone
        if SAMPLE_ID not in train.column_names:
            raise ConfigError(
                f"a teacher cache is read by block id: the training rows need a {SAMPLE_ID!r} column "
                "(prepare_distillation_data adds it)"
            )
        top = int(torch.as_tensor(train.with_format("torch")[SAMPLE_ID]).max())
        if top >= reader.num_blocks:
            raise DataError(
                f"teacher cache {root} holds blocks 0..{reader.num_blocks - 1}; the data has {top}"
            )
        first = train[0]
        block, ids = int(first[SAMPLE_ID]), torch.as_tensor(first["input_ids"])
        if ids.shape[-1] != reader.spec.block_size or not torch.equal(ids, reader.block(block).token_ids):
            raise DataError(
                f"training row 0 (block {block}) holds other tokens than teacher cache {root}'s block {block}: "
                f"prepare the data as the cache was made (its documents, tokenizer, block size "
                f"{reader.spec.block_size}, split seed)"
            )
    top_k = distillation.loss.kd_top_k if reader.spec.mode != "sampled" else None
    return CachedTeacher(reader, None, top_k=top_k, chain_rule=False, device=device)


class CallableSignal:
    """A user's ``signal(batch) -> HiddenAndHead`` as a :class:`~sakd.teacher.signal.TeacherSignal`: a live
    teacher whose output does not depend on the step."""

    capabilities = LIVE

    def __init__(self, fn: Callable[[dict[str, torch.Tensor]], TeacherOutput]) -> None:
        self.fn = fn

    def at_step(self, step: int) -> None:
        """Nothing depends on the step."""

    def __call__(self, batch: dict[str, torch.Tensor]) -> TeacherOutput:
        return self.fn(batch)


def as_signal(signal: TeacherSignal | Callable[[dict[str, torch.Tensor]], TeacherOutput]) -> TeacherSignal:
    """``signal`` itself when it is a :class:`TeacherSignal` (capabilities, ``at_step``), else wrapped as a live
    one."""
    return signal if isinstance(signal, TeacherSignal) else CallableSignal(signal)


def teacher_output(signal: TeacherSignal, batch: dict[str, torch.Tensor], step: int) -> TeacherOutput:
    """``signal(batch)`` at the Trainer's global ``step`` (completed optimizer steps: ``sakd distill``'s
    step counter); a signal that reads block ids refuses a batch without them."""
    caps = signal.capabilities
    if caps.reads_block_ids and "sample_ids" not in batch:
        need = "Knowledge Augmentation" if caps.routing == "ka" else caps.source.capitalize()
        raise ConfigError(
            f"{need} reads each batch's block ids (sample_ids), which this batch lacks: give the rows a "
            f"{SAMPLE_ID!r} column (prepare_distillation_data does) and use DistillationCollator"
        )
    signal.at_step(step)
    return signal(batch)


def distillation_config(distillation: DistillationConfig | dict | None) -> DistillationConfig:
    """A checked ``distillation`` section: the dataclass as given, or a dict validated like a recipe's."""
    if isinstance(distillation, DistillationConfig):
        return distillation
    cfg, _ = load_config({"distillation": distillation or {}})
    return cfg.distillation


def open_section(
    distillation: DistillationConfig | dict | None, teacher: object
) -> tuple[DistillationConfig, CacheReader | None]:
    """The checked section (``loss.sparse`` resolved for a teacher cache) and the cache's reader, if any."""
    cfg, reader = distillation_config(distillation), None
    if cfg.teacher_cache:
        reader, cfg = open_cache(cfg)
    if reader is not None and teacher is not None:
        raise ConfigError("distillation.teacher_cache replaces the teacher: pass teacher=None")
    return cfg, reader


def trainer_signal(
    run: RunConfig,
    placed: nn.Module | None,
    caller: object,
    cached: CachedTeacher | None,
    alignment: Alignment,
    aux: AuxTerms | None,
    device: torch.device,
) -> tuple[TeacherSignal | None, StudentAwareRouter | None]:
    """The one teacher signal (the placed teacher model's, a cache's, or the caller's signal object), checked
    against the run's parts."""
    signal, sar = build_teacher_signal(run, placed, alignment, aux, device, cached=cached)
    if signal is None and caller is not None:  # a teacher-signal object of the caller's
        signal = as_signal(caller)  # type: ignore[arg-type]
    for note in check_composition(run, LIVE if signal is None else signal.capabilities):
        log.info(note)
    return signal, sar
