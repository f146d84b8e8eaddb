"""Small builders, each owning one part of the config, that turn a :class:`RunConfig` into the pieces a
run trains with (the pattern of torchtitan's component builders). :class:`sakd.training.trainer.Distiller`
calls them in order; nothing here runs a training step.

====================  ===============================  ==============================================
builder               config                           builds
====================  ===============================  ==============================================
build_tokenizers      model.tokenizer / teacher_tok.   the student's and the teacher's tokenizers
build_student         model.student, dtype, peft, ...  the Hugging Face student (whole, not ZeRO-split)
build_data            data                             the tokenized, packed blocks (+ the teacher's tokens)
build_batch_plan      training.batch_size / accum.     which blocks each rank reads at each step
build_objective       distillation.*                   the objective (logit loss + auxiliary terms)
build_teacher_signal  distillation.moe / teacher_cache the teacher signal (online, KA / SAR-routed, cached)
build_ema             training.ema*                    the EMA of the student's weights, or None
====================  ===============================  ==============================================

Elsewhere: :func:`sakd.training.distributed.build_accelerator` (training.deepspeed / mixed precision),
:func:`sakd.align.setup.setup_alignment` (distillation.alignment), :func:`sakd.data.prepare_data`
(data), :func:`sakd.teacher.placement.load_teacher` (model.teacher*),
:func:`sakd.objective.aux_terms.build_aux_terms` (distillation.feature/attention/contrastive) and
:func:`sakd.training.stages.stage_optimizer` (optimization).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from sakd.align.positions import alignment_coverage
from sakd.align.setup import Alignment
from sakd.config import ModelConfig, RunConfig, TrainingConfig
from sakd.data import BatchPlan, DataBundle, prepare_data
from sakd.errors import ConfigError, DataError, SetupError
from sakd.losses import VocabBridge
from sakd.models import load_model, load_tokenizer
from sakd.models.loading import check_model_source, default_tokenizer_spec
from sakd.models.peft import wrap_student
from sakd.models.zero import built_whole
from sakd.objective.aux_terms import AuxTerms
from sakd.objective.composite import Objective
from sakd.objective.terms import needs_teacher_terms
from sakd.teacher.capabilities import LIVE, Capabilities
from sakd.teacher.moe_router import StudentAwareRouter
from sakd.teacher.routed import RoutedTeacher
from sakd.teacher.signal import CachedTeacher, OnlineTeacher, TeacherSignal
from sakd.training.ema import EMA_FILE, StudentEMA

log = logging.getLogger(__name__)


def needs_teacher(cfg: RunConfig) -> bool:
    """Whether any term of the objective that is on reads the teacher (:mod:`sakd.objective.terms`) or the
    teacher scores or writes text (``distillation.policy`` other than off)."""
    return needs_teacher_terms(cfg.distillation) or cfg.distillation.policy != "off"


def build_tokenizers(mcfg: ModelConfig, *, use_teacher: bool) -> tuple[Any, Any | None]:
    """The student's tokenizer, and the teacher's (the same object when both come from one place; None
    without a teacher). Model sources are checked first so a typo names the model, not its tokenizer."""
    check_model_source(mcfg.student, "student")
    if use_teacher:
        check_model_source(mcfg.teacher, "teacher")
    spec = default_tokenizer_spec(mcfg.student, mcfg.tokenizer)
    if spec is None:
        raise SetupError(f"student preset '{mcfg.student}' needs model.tokenizer (a tokenizer directory)")
    student_tok = load_tokenizer(spec, trust_remote_code=mcfg.trust_remote_code)
    teacher_spec = default_tokenizer_spec(mcfg.teacher, mcfg.teacher_tokenizer) or spec
    teacher_tok = student_tok
    if teacher_spec != spec and (use_teacher or mcfg.chat_template == "teacher"):
        teacher_tok = load_tokenizer(teacher_spec, trust_remote_code=mcfg.trust_remote_code)
    if mcfg.chat_template == "teacher":  # the student renders (and exports) the teacher's chat template
        if not getattr(teacher_tok, "chat_template", None):
            raise SetupError("model.chat_template=teacher but the teacher's tokenizer has no chat template")
        student_tok.chat_template = teacher_tok.chat_template
    return student_tok, teacher_tok if use_teacher else None


def build_student(mcfg: ModelConfig, tokenizer: Any, accelerator: Any, *, seed: int) -> Any:
    """The student as a Hugging Face model, whole on every rank (the ZeRO engine partitions it later);
    with ``model.peft`` a ``peft`` model whose adapters are its only trainable parameters."""
    qlora = mcfg.peft.method != "none" and mcfg.peft.quantize_base != "none"
    if qlora:
        check_qlora(accelerator)
    with built_whole(accelerator):
        student = load_model(
            mcfg.student,
            tokenizer=tokenizer,
            dtype=mcfg.student_dtype,
            trust_remote_code=mcfg.trust_remote_code,
            seed=seed,
            attn_implementation=mcfg.attn_implementation,
            quantization=mcfg.peft.quantize_base if qlora else "none",
            device=accelerator.device,
        )
    if mcfg.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    student.config.use_cache = False
    if mcfg.peft.method != "none":
        student = wrap_student(student, mcfg.peft, gradient_checkpointing=mcfg.gradient_checkpointing)
    rows = student.get_output_embeddings().weight.shape[0]
    if rows < len(tokenizer):
        raise SetupError(
            f"student has {rows} output rows but the tokenizer has {len(tokenizer)} tokens; "
            "resize the student's embeddings"
        )
    return student


def check_qlora(accelerator: Any) -> None:
    """QLoRA's 4-bit base needs bitsandbytes' CUDA kernels; DeepSpeed's engines do not handle it."""
    if accelerator.device.type != "cuda":
        raise ConfigError(
            "model.peft.quantize_base=4bit (QLoRA) needs a CUDA GPU (bitsandbytes 4-bit); use "
            "model.peft.quantize_base=none on this machine"
        )
    if accelerator.state.deepspeed_plugin is not None:
        raise ConfigError(
            "model.peft.quantize_base=4bit runs without DeepSpeed (one process or DDP); unset training.deepspeed"
        )


def build_data(
    cfg: RunConfig, tokenizer: Any, alignment: Alignment, accelerator: Any, *, paired: bool
) -> DataBundle:
    """The run's data; ``paired``: with the teacher's tokens and the alignment when the tokenizers differ (a
    live teacher; a cache brings its own alignment, :mod:`sakd.teacher.cache.lookup`)."""
    acc, al = accelerator, alignment
    paired = al.aligned and paired
    with acc.main_process_first():
        data = prepare_data(cfg.data, tokenizer, cfg.training.seed, al.teacher_tokenizer if paired else None)
    acc.print(data.describe(cfg.data.sample_by))
    if paired:
        al.stats.update(alignment_coverage(data.train))
        acc.print(
            "alignment: {mapped}/{student_vocab} student tokens map to the teacher vocabulary "
            "({student_coverage:.1%}); {anchored:.1%} of student positions end on a shared boundary, "
            "{multi_token:.1%} are spelt by several teacher tokens".format(**al.stats)
        )
    return data


def build_batch_plan(tcfg: TrainingConfig, num_blocks: int, world_size: int) -> BatchPlan:
    """Which blocks each rank reads at each optimizer step; at least one full step must fit."""
    plan = BatchPlan(
        num_blocks=num_blocks,
        micro_batch=tcfg.batch_size,
        accumulation=tcfg.gradient_accumulation_steps,
        world_size=world_size,
        seed=tcfg.seed,
    )
    if plan.steps_per_epoch == 0:
        raise DataError(
            f"{num_blocks} training blocks cannot fill one optimizer step of {plan.blocks_per_step} "
            "blocks; lower training.batch_size / gradient_accumulation_steps or add data"
        )
    return plan


def build_objective(
    cfg: RunConfig,
    vocab_size: int,
    alignment: Alignment,
    aux: AuxTerms | None,
    teacher: Capabilities = LIVE,
) -> Objective:
    """The objective of ``distillation.*`` between this student vocabulary and the paired teacher's, for a
    teacher signal with capabilities ``teacher``."""
    teacher_tok = alignment.teacher_tokenizer
    return Objective(
        cfg.distillation.loss,
        vocab_size=vocab_size,
        teacher_vocab_size=len(teacher_tok) if teacher_tok is not None else None,
        bridge=VocabBridge(vocab_map=alignment.vocab_map, teacher_to_student=alignment.teacher_to_student),
        distillation=cfg.distillation,
        aux=aux,
        seed=cfg.training.seed if cfg.distillation.cache.seed is None else cfg.distillation.cache.seed,
        teacher=teacher,
    )


def build_teacher_signal(
    cfg: RunConfig,
    teacher: torch.nn.Module | None,
    alignment: Alignment,
    aux: AuxTerms | None,
    device: torch.device,
    *,
    cached: CachedTeacher | None = None,
) -> tuple[TeacherSignal | None, StudentAwareRouter | None]:
    """The run's one teacher signal: read from an offline cache (``cached``, made by
    :func:`sakd.teacher.cache.attach.cached_teacher`), else the frozen teacher model -- plain, or an MoE
    teacher routed from outside (``distillation.moe``): Knowledge Augmentation, or all experts through a
    Student-Aware Router (returned too); None without either."""
    if cached is not None:
        return cached, None
    if teacher is None:
        return None, None
    hidden = aux.teacher_layers if aux else []
    attention = aux.teacher_attention if aux else []
    moe = cfg.distillation.moe
    if not (moe.augment_samples or moe.student_aware_router):
        return OnlineTeacher(
            teacher, aligned=alignment.aligned, hidden_layers=hidden, attention_layers=attention
        ), None
    sar = StudentAwareRouter(teacher, moe, device) if moe.student_aware_router else None
    signal = RoutedTeacher(
        teacher,
        aligned=alignment.aligned,
        hidden_layers=hidden,
        attention_layers=attention,
        seed=cfg.training.seed,
        augment=moe if moe.augment_samples else None,
        keep_samples=cfg.distillation.loss.kind == "fkl" and moe.augment_samples > 1,
        sar=sar,
    )
    return signal, sar


def build_ema(
    tcfg: TrainingConfig, student: torch.nn.Module, resume_from: Path | None, zero: int
) -> StudentEMA | None:
    """The EMA of the student (``training.ema``): from the checkpoint resumed from, else the current weights."""
    if not tcfg.ema:
        return None
    if zero == 3:
        raise ConfigError("training.ema needs whole parameters on every rank; it does not support ZeRO-3")
    ema = StudentEMA(student, tcfg.ema_decay, tcfg.ema_warmup_steps)
    if resume_from is not None:
        if (resume_from / EMA_FILE).is_file():
            ema.load(resume_from / EMA_FILE)
        else:
            log.warning("%s has no %s: the EMA starts from the resumed weights", resume_from, EMA_FILE)
    return ema
