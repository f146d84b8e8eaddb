"""``sakd plan``: how much GPU memory a distillation run needs per GPU, and which setup fits.

The planner never allocates weights: parameter counts come from the model instantiated on the meta
device (exact, including tied embeddings and fused MoE expert tensors), everything else from closed
formulas over the config. Each candidate setup (ZeRO stage, offload, optimizer, gradient
checkpointing, micro-batch) gets a per-component estimate in bytes; the fastest one under the budget
is recommended. :class:`Setup`, :class:`Workload` and the per-component formulas named below
(with their constants) live in :mod:`sakd.planner.components`.

Accounting (``P`` student parameters, ``N`` GPUs, ``m`` bytes of the master dtype, normally 4):

* stage 0 (plain PyTorch/DDP under Accelerate): weights ``m·P``, plus ``2·P`` for autocast's cache of
  16-bit weight copies under fp16/bf16; gradients ``m·P`` (and ``m·P`` more for DDP's gradient buckets
  when ``N > 1``); AdamW ``2·m·P`` (exp_avg, exp_avg_sq), bitsandbytes 8-bit ``2·P``.
* ZeRO 1-3 (DeepSpeed): with fp16/bf16 the model holds 16-bit weights ``2·P`` (ZeRO-3: ``/N`` plus
  the gathered layers, current + prefetched) and the optimizer an fp32 master copy ``4·P/N`` (listed
  under student weights); 16-bit gradients ``2·P`` (ZeRO-2/3: ``/N`` plus two reduce buckets,
  :data:`REDUCE_BUCKET_ELEMENTS`) and the fp32 gradient partition ``4·P/N`` DeepSpeed builds for the
  step; AdamW ``8·P/N``, 8-bit ``2·P/N``. Optimizer offload moves master, fp32 gradients and states
  to the CPU; ZeRO-3 parameter offload leaves only the gathered layers on the GPU. Without mixed
  precision DeepSpeed trains in fp32: weights ``4·P``, gradients ``4·P``, no master copy.
* a PEFT student (``model.peft``): the formulas above with ``P`` for the weights but the trained
  parameters ``P_a`` (its adapters) for everything that exists only for trained ones -- autocast's
  copies, gradients, master copies, optimizer states -- and no output-head gradient in the loss;
  QLoRA keeps the base's linear layers at 0.5 byte per parameter.
* teacher: ``P_t`` × its dtype (bitsandbytes 8/4-bit: 1 / 0.5 bytes for the linear layers); a ZeRO-3
  teacher holds ``1/N`` plus its gathered layers, an offloaded one only the gathered layers.
* activations: see :func:`layer_activation_bytes` and :func:`student_activation_bytes`; teacher
  forward (no grad) in :func:`teacher_activation_bytes`; the fused loss in :func:`loss_bytes`.
* generation (``distillation.policy`` on / mixed / sequence), before the step's forward: the KV cache of
  the model that writes (:func:`kv_cache_bytes`), the last position's logits, and under ZeRO-3 the rest
  of the student gathered whole for the generation (:func:`generation_bytes`); it counts only where it
  exceeds the training step's own transients (activations, teacher activations, the loss), which it
  never coexists with.
* a fixed :data:`OVERHEAD_BYTES` for the CUDA context, cuBLAS/NCCL workspaces and allocator slack.

The estimate is the sum of the components at the moment of the peak: the end of the student's
forward, when the fused loss's workspace is live on top of all saved activations (transients of other
moments count only where they exceed it, see :func:`estimate`). With gradient accumulation (the
recipe's usual setting) gradients and optimizer states are alive then; with a single micro-batch per
step it over-estimates by the gradients. ``tests/test_plan.py`` measures the CPU (stage 0, fp32) case.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sakd.planner.components import (
    DTYPE_BYTES,
    GIB,
    QUANT_BYTES,
    Setup,
    Workload,
    generation_bytes,
    kv_cache_bytes,  # noqa: F401 -- re-exported: this module's public formulas stay importable from it
    loss_bytes,
    student_activation_bytes,
    teacher_activation_bytes,
    teacher_weight_bytes,
)
from sakd.planner.sizes import ModelNumbers

REDUCE_BUCKET_ELEMENTS = 50_000_000
"""``reduce_bucket_size`` of ds_configs/zero*.json; with ``overlap_comm`` ZeRO-2/3 keep two such 16-bit
gradient buffers (one filling while the other is reduced)."""


COMPONENTS = (
    "teacher_weights",
    "student_weights",
    "gradients",
    "optimizer",
    "activations",
    "teacher_activations",
    "loss",
    "generation",
    "overhead",
)


@dataclass(frozen=True)
class Estimate:
    """Per-GPU bytes by component for one setup."""

    setup: Setup
    components: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.components.values())

    def to_dict(self, budget: int) -> dict[str, Any]:
        return {
            "plan": self.setup.describe(),
            **asdict(self.setup),
            "relative_time": round(self.setup.cost(), 3),
            "bytes": self.components,
            "total_bytes": self.total,
            "total_gib": round(self.total / GIB, 3),
            "fits": self.total <= budget,
        }


def estimate(student: ModelNumbers, teacher: ModelNumbers | None, setup: Setup, w: Workload) -> Estimate:
    """Per-GPU memory of one setup, by component (see the module docstring for the accounting)."""
    p, n, s = student.total_params, w.num_gpus, setup.stage
    t = student.trained  # gradients, master copies and optimizer states exist for these only
    master = DTYPE_BYTES[w.student_dtype]
    mixed = w.mixed_precision in ("fp16", "bf16")
    state_bytes = 2 if setup.optimizer == "adamw_8bit" else 2 * master  # two Adam moments
    if s == 0:
        # autocast caches 16-bit copies of the weights that require grad (a frozen base is re-cast per use)
        weights = p * master + (2 * t if mixed else 0)
        if w.student_quantization in QUANT_BYTES:  # QLoRA: linear layers in 4 bits, adapters in fp32
            linear = p - student.embedding_params - t
            weights = int(linear * QUANT_BYTES[w.student_quantization]) + (p - linear) * master
        grads = t * master * (2 if n > 1 else 1)
        optimizer = t * state_bytes
        head_bytes = (
            4 if w.student_dtype == "float16" else master
        )  # sakd.losses.stored_grads: fp16 kept in fp32
    else:
        model_bytes = 2 if mixed else master
        gathered = 2 * student.layer_params * model_bytes  # ZeRO-3: the layer in use and the prefetched one
        sharded = gathered + (0 if setup.offload_params else p * model_bytes // n)
        weights = (sharded if s == 3 else p * model_bytes) + (
            0 if setup.offload_optimizer or not mixed else 4 * t // n
        )
        bucket = 2 * REDUCE_BUCKET_ELEMENTS * model_bytes
        grads = t * model_bytes if s == 1 else t * model_bytes // n + bucket
        if mixed and not setup.offload_optimizer:
            grads += 4 * t // n  # the fp32 gradient partition of the step
        optimizer = 0 if setup.offload_optimizer else t * (2 if setup.optimizer == "adamw_8bit" else 8) // n
        # the fused losses keep an fp16 head's gradients in float32 (sakd.losses.stored_grads)
        fp16 = w.mixed_precision == "fp16" or (not mixed and w.student_dtype == "float16")
        head_bytes = 4 if fp16 else model_bytes
    act_bytes = 2 if mixed else master
    stream_bytes = master if s == 0 else act_bytes  # autocast keeps the residual stream in fp32
    tokens = setup.micro_batch * w.seq_len
    saved, backward_extra = student_activation_bytes(
        student, tokens, setup.gradient_checkpointing, act_bytes, stream_bytes
    )
    workspace, loss_grads = loss_bytes(student, teacher, tokens, w, head_bytes)
    t_weights, t_kept, t_working = 0, 0, 0
    if teacher is not None:
        t_weights, t_bytes = teacher_weight_bytes(teacher, w, s)
        t_kept, t_working = teacher_activation_bytes(teacher, tokens, t_bytes)
    # Transients that never coexist count only beyond the peak they are compared with: the loss
    # workspace (end of forward) vs a recomputed layer (backward), and the teacher's working set
    # (before the student's forward) vs the student's saved activations and the loss.
    components = {
        "teacher_weights": t_weights,
        "student_weights": weights,
        "gradients": grads,
        "optimizer": optimizer,
        "activations": saved + max(0, backward_extra - workspace),
        "teacher_activations": t_kept + max(0, t_working - saved - workspace - loss_grads),
        "loss": workspace + loss_grads,
        "overhead": w.overhead,
    }
    transients = components["activations"] + components["teacher_activations"] + components["loss"]
    components["generation"] = max(0, generation_bytes(student, teacher, setup, w, act_bytes) - transients)
    return Estimate(setup, components)


def candidate_setups(micro_batches: list[int]) -> list[Setup]:
    """Every combination the planner weighs: ZeRO 0/1/2/2+offload/3/3+offload × AdamW / 8-bit AdamW
    (bitsandbytes' states live on the GPU, so not with offload) × checkpointing × micro-batch."""
    zero = []
    for stage in (0, 1, 2, 3):
        zero.append((stage, False, False))
        if stage >= 2:
            zero.append((stage, True, stage == 3))
    return [
        Setup(stage, off_opt, off_par, opt, ckpt, mb)
        for stage, off_opt, off_par in zero
        for opt in ("adamw", "adamw_8bit")
        if not (off_opt and opt == "adamw_8bit")
        for ckpt in (False, True)
        for mb in micro_batches
    ]


def rank(estimates: list[Estimate], budget: int) -> list[Estimate]:
    """The setups that fit, fastest first (ties: less memory first)."""
    return sorted((e for e in estimates if e.total <= budget), key=lambda e: (e.setup.cost(), e.total))


# --------------------------------------------------------------------------------------------- CLI
