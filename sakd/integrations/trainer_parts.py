"""The parts of :class:`~sakd.integrations.DistillationTrainer` that need no Trainer state: the tokenizers'
alignment, sakd's parameter groups, the loss run inside the prepared module's forward, the per-token log
values, saving and loading through the Hugging Face student, the teacher's placement, and the runner of
``distillation.policy``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer, TrainingArguments

from sakd.align.setup import Alignment, setup_alignment
from sakd.config import ConfigError, DataConfig, DistillationConfig, RunConfig, TrainingConfig
from sakd.config.data_schema import check_chat
from sakd.data import BatchPlan
from sakd.models.student import TrainableStudent, student_state
from sakd.objective.composite import Objective
from sakd.policy import Models, PolicyRunner, build_policy
from sakd.teacher.placement import teacher_engine
from sakd.training.distributed import leave_process_group
from sakd.training.optim import param_groups

AUX_FILE = "sakd_aux.safetensors"
"""The auxiliary projections, saved next to the student by :meth:`DistillationTrainer.save_model`."""


def trainer_run(distillation: DistillationConfig, seed: int, data: Any, kwargs: dict[str, Any]) -> RunConfig:
    """The run's sections as ``sakd distill`` would hold them: ``distillation``, ``training.seed`` (the
    Trainer's: the seed of rollouts and of on-the-fly sampled draws), and the ``data`` section of ``data`` (what :func:`~sakd.integrations.prepare_distillation_data`
    returned; its datasets and collator become the Trainer's ``kwargs``' defaults), else of the
    ``data_collator`` in ``kwargs`` when that function made it (else the default: text)."""
    if data is not None:
        for key, value in (("train_dataset", data.train), ("eval_dataset", data.eval)):
            kwargs.setdefault(key, value)
        kwargs.setdefault("data_collator", data.collator)
    source = data.collator if data is not None else kwargs.get("data_collator")
    dcfg = getattr(source, "data_config", None) or DataConfig()
    run = RunConfig(data=dcfg, distillation=distillation, training=TrainingConfig(seed=seed))
    check_chat(run)
    split = getattr(source, "seed", seed)
    if dcfg.format == "chat" and distillation.policy != "off" and not dcfg.eval and split != seed:
        raise ConfigError(
            f"distillation.policy={distillation.policy} prompts with the training conversations: prepare the "
            f"data with seed=TrainingArguments.seed ({seed}), not {split}, so they are the training split"
        )
    return run


def trainer_alignment(run: RunConfig, tokenizer: Any, teacher_tokenizer: Any) -> Alignment:
    """The alignment of the student's tokenizer with the teacher's (``teacher_tokenizer``; None: the same);
    over conversations also of two templates on one vocabulary, as in ``sakd distill``."""
    from accelerate import PartialState

    if teacher_tokenizer is not None and tokenizer is None:
        raise ConfigError(
            "teacher_tokenizer needs processing_class: the student's tokenizer to align it with"
        )
    return setup_alignment(
        run.distillation.alignment,
        tokenizer,
        teacher_tokenizer if teacher_tokenizer is not None else tokenizer,
        PartialState(),
        own_templates=run.data.format == "chat",
    )


def trainer_param_groups(
    wrapper: TrainableStudent, weight_decay: float, lr: float, lr_multipliers: dict[str, float]
) -> list[dict[str, Any]]:
    """sakd's parameter groups of the student inside ``wrapper`` (``lr_multipliers``, no decay on biases and
    norms), and the auxiliary projections at the base rate."""
    groups = param_groups(wrapper.module, weight_decay, lr, lr_multipliers)
    if not groups:
        raise ConfigError("lr_multipliers freeze every student parameter: nothing to train")
    for group in groups:
        group.pop("names")
    if wrapper.aux is not None:
        groups.append({"params": list(wrapper.aux.parameters()), "lr": lr, "weight_decay": 0.0})
    return groups


def student_loss(
    objective: Objective,
    wrapper: TrainableStudent,
    batch: dict,
    teacher_out: Any,
    temperature: float,
    **kwargs: Any,
) -> Any:
    """Student forward + objective of one micro-batch, run inside the prepared module's forward."""
    return objective.student_loss(wrapper.module, batch, teacher_out, temperature=temperature, **kwargs)


def per_token(
    sums: dict[str, torch.Tensor], tokens: int, accelerator: Any, device: torch.device
) -> dict[str, float]:
    """The objective's component sums since the last log, summed over ranks, per token."""
    keys = sorted(sums)
    totals = accelerator.reduce(torch.stack([sums[k].to(device) for k in keys]), "sum")
    return {k: float(v) / max(tokens, 1) for k, v in zip(keys, totals.tolist(), strict=True)}


@contextlib.contextmanager
def student_as_model(trainer: Trainer) -> Iterator[TrainableStudent]:
    """The Trainer's own saving/loading code, run on the Hugging Face student (a ``PreTrainedModel`` or
    ``peft`` model it knows how to save and load) instead of the wrapper."""
    wrapper = cast(TrainableStudent, trainer.model)
    trainer.model = wrapper.module
    try:
        yield wrapper
    finally:
        trainer.model = wrapper


def save_student(
    trainer: Trainer, save: Callable[..., None], output_dir: str, state_dict: dict | None
) -> None:
    """The student as the Trainer saves a model (``save(state_dict=...)``: ``Trainer._save``, which
    ``from_pretrained`` loads), and the projections in :data:`AUX_FILE`."""
    aux_state = None
    if state_dict is not None:  # DeepSpeed gathered the wrapper's state: split it
        aux_state = {k[len("aux.") :]: v for k, v in state_dict.items() if k.startswith("aux.")}
        state_dict = student_state(state_dict)
    with student_as_model(trainer) as wrapper:
        save(state_dict=state_dict)
    if wrapper.aux is not None and trainer.args.should_save and aux_state != {}:  # {}: in DeepSpeed's files
        aux_state = aux_state if aux_state is not None else wrapper.aux.state_dict()
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in aux_state.items()}, f"{output_dir}/{AUX_FILE}"
        )


def load_aux(directory: str, wrapper: TrainableStudent) -> None:
    """The projections saved next to the student in ``directory`` (:data:`AUX_FILE`)."""
    path = f"{directory}/{AUX_FILE}"
    if wrapper.aux is not None:
        try:
            state = load_file(path)
        except FileNotFoundError:
            raise ConfigError(f"{directory} has no {AUX_FILE}: the projections cannot be restored") from None
        wrapper.aux.load_state_dict(state)


def place_teacher(teacher: nn.Module, zero_stage: int, args: TrainingArguments) -> nn.Module:
    """Under ZeRO-3 an inference-only engine partitions the frozen teacher; otherwise it moves to the training
    device."""
    if zero_stage != 3:  # a bitsandbytes-quantized teacher is already placed (and cannot move)
        return teacher if getattr(teacher, "is_quantized", False) else teacher.to(args.device)
    batch = {
        "train_micro_batch_size_per_gpu": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
    }
    return teacher_engine(teacher, batch, offload=False)


def trainer_policy(
    run: RunConfig, objective: Objective, trainer: Any, teacher: object, alignment: Alignment
) -> PolicyRunner | None:
    """The runner of ``distillation.policy`` (None for ``off``) of a Trainer: the blocks' prompts are
    continued as ``sakd distill`` continues them (the student's model, the prepared one once the Trainer made
    it; the teacher model for ``sequence``), with the Trainer's seed, step and block ids."""
    if run.distillation.policy == "off":
        return None
    tokenizer, args = trainer.processing_class, trainer.args
    if tokenizer is None:
        raise ConfigError(
            f"distillation.policy={run.distillation.policy} needs processing_class: the tokenizer"
        )
    if run.distillation.policy == "sequence" and teacher is None:
        raise ConfigError(
            "distillation.policy=sequence needs the teacher model (teacher=...) to write the text"
        )
    zero = zero_stage(trainer)
    models = Models(
        trainer.model,
        zero,
        teacher,
        "zero3" if zero == 3 else "replicated",
        tokenizer,
        alignment.teacher_tokenizer if alignment.aligned else None,
    )
    dataset = trainer.train_dataset
    plan = BatchPlan(
        num_blocks=len(dataset) if hasattr(dataset, "__len__") else 0,
        micro_batch=args.per_device_train_batch_size,
        accumulation=args.gradient_accumulation_steps,
        world_size=trainer.accelerator.num_processes,
        seed=args.seed,
    )
    return build_policy(run, objective, models, plan, trainer.accelerator)


def zero_stage(trainer: Any) -> int:
    """The Trainer's ZeRO stage (-1 without DeepSpeed)."""
    plugin = trainer.accelerator.state.deepspeed_plugin if trainer.is_deepspeed_enabled else None
    return -1 if plugin is None else int(plugin.zero_stage)


def end_run(trainer: Any) -> None:
    """``Trainer.end``: the trackers finished, then the ranks leave the process group together
    (:func:`~sakd.training.distributed.leave_process_group`). ``Trainer.end`` destroys the group right after
    the last collective, which can reset a peer still reading that collective's reply."""
    for tracker in trainer.accelerator.trackers:
        tracker.finish()
    if not trainer.accelerator.state.fork_launched:  # notebook_launcher's group: Accelerate keeps it too
        leave_process_group()
