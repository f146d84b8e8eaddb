"""``sakd plan``: how much GPU memory a distillation run needs per GPU, and which setup fits.

The planner never allocates weights: parameter counts come from the model instantiated on the meta
device (exact, including tied embeddings and fused MoE expert tensors), everything else from closed
formulas over the config. Each candidate setup (ZeRO stage, offload, optimizer, gradient
checkpointing, micro-batch) gets a per-component estimate in bytes; the fastest one under the budget
is recommended.

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

from sakd.config import RunConfig
from sakd.losses.chunk_size import resolve_chunk_size
from sakd.losses.logit_grads import block_rows
from sakd.planner.sizes import ModelNumbers

GIB = 1024**3
OVERHEAD_BYTES = 3 * GIB // 4
"""CUDA context (~0.3-0.5 GiB with PyTorch's kernels loaded), cuBLAS and NCCL workspaces, and slack
for the caching allocator's fragmentation: 0.75 GiB per GPU."""

REDUCE_BUCKET_ELEMENTS = 50_000_000
"""``reduce_bucket_size`` of ds_configs/zero*.json; with ``overlap_comm`` ZeRO-2/3 keep two such 16-bit
gradient buffers (one filling while the other is reduced)."""

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
QUANT_BYTES = {"8bit": 1.0, "4bit": 0.5}

BRIDGE_BLOCK_ROWS = 4
"""``[block, M]`` fp32 temporaries alive at once in a block of the closed-form KD across vocabularies
(:mod:`sakd.losses.bucket_grads`; ``M <= min(Vs, Vt) + 2`` buckets: one per student id the teacher
reaches, the own target, the tail): the student's bucket logits, the teacher's bucket log-probabilities,
the divergence's scratch and the tail's masked copy, on top of the preallocated ``[block, max(Vs, Vt)]``
scratch (and the ``[block, Vs]`` CE one with labels). ``tests/test_plan.py`` measures it."""

CHECKPOINTING_COST = 4 / 3
"""Gradient checkpointing recomputes the forward in backward: forward+backward ≈ 3 forward units
become 4."""
OPTIMIZER_OFFLOAD_COST = 1.3
"""ZeRO-Offload: the CPU Adam step and the PCIe copy of gradients and weights every step."""
PARAM_OFFLOAD_COST = 2.0
"""ZeRO-Infinity style parameter offload: every layer's weights cross PCIe in forward and backward."""
STAGE_COST = {0: 1.0, 1: 1.0, 2: 1.02, 3: 1.15}
"""Extra communication per step. ZeRO-1's reduce-scatter + all-gather move as much as DDP's all-reduce
(equal cost: the one with more room wins the tie); ZeRO-2 adds bucketed reduce-scatters during
backward; ZeRO-3 all-gathers the weights in forward and again in backward."""
EIGHT_BIT_COST = 1.02
"""bitsandbytes' 8-bit AdamW: block-wise (de)quantization of the states in the step."""


def _micro_batch_cost(micro_batch: int) -> float:
    """Small micro-batches leave the GPU under-used and pay per-step launch overheads: a kernel over
    ``b`` sequences takes roughly ``b + 0.5`` sequences' worth of time."""
    return (micro_batch + 0.5) / micro_batch


# ---------------------------------------------------------------------------------------- estimate


@dataclass(frozen=True)
class Setup:
    """One candidate way to run: the knobs the planner varies."""

    stage: int  # ZeRO stage; 0 = plain PyTorch (single GPU or DDP)
    offload_optimizer: bool = False  # ZeRO >= 2: optimizer states and fp32 master on the CPU
    offload_params: bool = False  # ZeRO-3: 16-bit weights on the CPU as well
    optimizer: str = "adamw"  # adamw | adamw_8bit
    gradient_checkpointing: bool = False
    micro_batch: int = 1

    def describe(self) -> str:
        zero = "no ZeRO" if self.stage == 0 else f"ZeRO-{self.stage}"
        if self.offload_params:
            zero += "+offload(param,opt)"
        elif self.offload_optimizer:
            zero += "+offload(opt)"
        ckpt = "ckpt" if self.gradient_checkpointing else "no-ckpt"
        return f"{zero}, {self.optimizer}, {ckpt}, mb={self.micro_batch}"

    def cost(self) -> float:
        """Relative time per token (lower is faster); the ranking is documented at the constants."""
        cost = STAGE_COST[self.stage] * _micro_batch_cost(self.micro_batch)
        if self.gradient_checkpointing:
            cost *= CHECKPOINTING_COST
        if self.offload_params:
            cost *= PARAM_OFFLOAD_COST
        elif self.offload_optimizer:
            cost *= OPTIMIZER_OFFLOAD_COST
        if self.optimizer == "adamw_8bit":
            cost *= EIGHT_BIT_COST
        return cost


@dataclass(frozen=True)
class Workload:
    """What the recipe fixes: sequence length, precisions, the loss, placement, the world size."""

    seq_len: int
    num_gpus: int = 1
    mixed_precision: str = "no"  # no | fp16 | bf16
    student_dtype: str = "float32"
    teacher_dtype: str = "float32"
    teacher_quantization: str = "none"
    teacher_placement: str = "auto"  # auto | replicated | zero3
    teacher_offload: bool = False
    student_quantization: str = "none"  # QLoRA: the frozen base in 4-bit (model.peft.quantize_base)
    chunk_size: int | str = "auto"
    aligned: bool = False  # different tokenizers: the vocabulary-bridged closed form
    with_labels: bool = True  # alpha < 1: the CE term needs its own scratch block
    generated_seq_len: int = 0  # distillation.policy: prompt + new tokens per generated sequence (0: none)
    teacher_writes: bool = False  # sequence-level KD: the teacher generates (and holds the KV cache)
    overhead: int = OVERHEAD_BYTES

    @classmethod
    def from_config(cls, cfg: RunConfig, num_gpus: int, aligned: bool) -> Workload:
        m, loss, d = cfg.model, cfg.distillation.loss, cfg.distillation
        generated = 0 if d.policy == "off" else d.generation.prompt_tokens + d.generation.max_new_tokens
        return cls(
            seq_len=max(cfg.data.block_size, generated),
            num_gpus=num_gpus,
            mixed_precision=cfg.training.mixed_precision,
            student_dtype=m.student_dtype,
            teacher_dtype=m.teacher_dtype,
            teacher_quantization=m.teacher_quantization,
            teacher_placement=m.teacher_placement,
            teacher_offload=m.teacher_offload,
            student_quantization=m.peft.quantize_base if m.peft.method != "none" else "none",
            chunk_size=loss.chunk_size,
            aligned=aligned,
            with_labels=loss.alpha < 1,
            generated_seq_len=generated,
            teacher_writes=d.policy == "sequence",
        )


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


NORM_ELEMENTS = 6
"""Per token and layer, the two RMSNorms keep ``6·h`` elements (input, normalized copy, output); HF's
Llama/Qwen RMSNorm computes in fp32 whatever the model dtype, so these are always 4 bytes."""


def layer_activation_bytes(m: ModelNumbers, act_bytes: int) -> int:
    """Bytes per token that autograd keeps for backward in one decoder layer (HF Llama/Qwen blocks,
    SDPA attention), ``act_bytes`` per element outside the norms (2 under fp16/bf16, else 4).

    Counted from the saved tensors, in the spirit of Korthikanti et al. (2022), whose ``34·h`` per
    token assumes a GPT block (4h GELU MLP, dropout masks) and whose ``5·a·s`` term is the attention
    score matrix, which SDPA / FlashAttention never store (they keep the output and a log-sum-exp):

    * two RMSNorms: :data:`NORM_ELEMENTS` ``·h`` in fp32;
    * attention: RoPE'd queries and keys, values, SDPA output and its contiguous copy fed to o_proj:
      ``3·a·d + 2·kv·d`` (Qwen3's q/k norms add ``2·a·d + 2·kv·d``);
    * dense SwiGLU MLP: gate, SiLU(gate), up, their product: ``4·f``; an MoE layer: per routed token
      the gathered input and the weighted output plus the expert's ``4·f``, times ``k`` experts, and
      the router's logits and probabilities ``2·E``.
    """
    q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
    attention = 3 * q + 2 * kv + (2 * q + 2 * kv if m.qk_norm else 0)
    if m.experts:
        mlp = m.experts_per_token * (2 * m.hidden + 4 * m.ffn) + 2 * m.experts
    else:
        mlp = 4 * m.ffn
    return NORM_ELEMENTS * m.hidden * 4 + (attention + mlp + m.adapter_elements) * act_bytes


def student_activation_bytes(
    m: ModelNumbers, tokens: int, checkpointing: bool, act_bytes: int, stream_bytes: int
) -> tuple[int, int]:
    """Student activations for ``tokens`` tokens per micro-batch: (bytes saved for backward at the end
    of the forward, extra bytes while backward runs).

    Without checkpointing every layer's saved tensors are alive when the forward ends, and backward
    adds almost nothing: it frees each layer's saved tensors about as fast as it makes gradient
    temporaries (measured: +1-4 % of the saved bytes). With HF's per-layer checkpointing only each
    layer's input is kept (``h`` per token of the residual stream, ``stream_bytes`` each: fp32 under
    autocast, the model dtype under DeepSpeed); backward then recomputes one layer at a time, one more
    layer's saved tensors. Outside the layers: the final norm (``3·h``, fp32).
    """
    layer = layer_activation_bytes(m, act_bytes)
    final_norm = 3 * m.hidden * 4
    if checkpointing:
        return tokens * (m.layers * m.hidden * stream_bytes + final_norm), tokens * layer
    return tokens * (m.layers * layer + final_norm), 0


def teacher_activation_bytes(m: ModelNumbers, tokens: int, act_bytes: int) -> tuple[int, int]:
    """Teacher forward under no_grad: (final hidden states, kept for the loss; one layer's working set).

    Every intermediate is freed once used, so the working set is one layer's: residual, normed input and
    the larger of attention (q, k, v, output) and MLP (gate, up, product; for an MoE per routed token
    the gathered input, gate_up, product and output)."""
    q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
    attention = 2 * q + 2 * kv
    mlp = m.experts_per_token * (2 * m.hidden + 4 * m.ffn) if m.experts else 4 * m.ffn
    return tokens * m.hidden * act_bytes, tokens * (2 * m.hidden + max(attention, mlp)) * act_bytes


def loss_bytes(
    student: ModelNumbers, teacher: ModelNumbers | None, tokens: int, w: Workload, head_bytes: int
) -> tuple[int, int]:
    """The fused KD loss (:mod:`sakd.losses.fused`): (its transient workspace, the gradients it keeps).

    The workspace is fp32 ``[chunk, V]`` logits, student and teacher side (the chunk as the loss resolves
    ``chunk_size``, :func:`sakd.losses.chunk_size.resolve_chunk_size`), plus the scratch blocks of the
    closed forms (:func:`sakd.losses.logit_grads.block_rows` rows each): one ``[block, max(Vs, Vt)]``, one
    ``[block, Vs]`` for the CE gradient with labels, and :data:`BRIDGE_BLOCK_ROWS` ``[block, buckets]``
    across vocabularies. The gradients are computed in the forward pass and kept until backward: ``[tokens, Hs]``
    for the hidden states and ``[Vs, Hs]`` for the head, in the head's dtype."""
    vs, vt = student.vocab, teacher.vocab if teacher else 0
    ht = teacher.hidden if teacher else 0
    rows = min(resolve_chunk_size(w.chunk_size, tokens, (vs, vt), (student.hidden, ht)), tokens)
    widest = max(vs, vt)
    block = block_rows(rows, widest)
    buckets = min(vs, vt) + 2 if w.aligned else 0
    blocks = block * (widest + (vs if w.with_labels else 0) + BRIDGE_BLOCK_ROWS * buckets)
    workspace = (rows * (vs + vt) + blocks) * 4
    head_rows = student.vocab if student.head_trainable else 0  # a frozen head (PEFT) gets no gradient
    return workspace, (tokens + head_rows) * student.hidden * head_bytes


def kv_cache_bytes(m: ModelNumbers, sequences: int, tokens: int, dtype_bytes: int) -> int:
    """The KV cache of ``sequences`` sequences of ``tokens`` tokens (prompt + generated): a key and a value
    vector of ``kv_heads · head_dim`` per layer and token (transformers' ``DynamicCache``; checked against
    the cache ``generate`` builds in ``tests/test_plan.py``)."""
    return 2 * m.layers * m.kv_heads * m.head_dim * sequences * tokens * dtype_bytes


def generation_bytes(
    student: ModelNumbers, teacher: ModelNumbers | None, setup: Setup, w: Workload, act_bytes: int
) -> int:
    """Generation's working set beyond what the step keeps anyway: the writer's KV cache for the
    micro-batch, its last-position logits (fp32, a few copies through the logits processors), and under
    ZeRO-3 the student's parameters gathered whole (:mod:`sakd.policy.engines`) beyond its own partition."""
    if not w.generated_seq_len:
        return 0
    teacher_writes = w.teacher_writes and teacher is not None
    writer = teacher if teacher_writes else student
    cache_dtype = DTYPE_BYTES[w.teacher_dtype] if teacher_writes else act_bytes
    cache = kv_cache_bytes(writer, setup.micro_batch, w.generated_seq_len, cache_dtype)
    logits = 3 * setup.micro_batch * writer.vocab * 4
    gathered = 0
    if setup.stage == 3 and not teacher_writes:
        model_bytes = 2 if w.mixed_precision in ("fp16", "bf16") else DTYPE_BYTES[w.student_dtype]
        gathered = student.total_params * model_bytes * (w.num_gpus - 1) // w.num_gpus
    return cache + logits + gathered


def _teacher_weight_bytes(t: ModelNumbers, w: Workload, stage: int) -> tuple[int, int]:
    """(teacher weight bytes on each GPU, bytes per element of its activations)."""
    dtype = DTYPE_BYTES[w.teacher_dtype]
    if w.teacher_quantization in QUANT_BYTES:
        linear = t.total_params - t.embedding_params
        return int(linear * QUANT_BYTES[w.teacher_quantization]) + t.embedding_params * dtype, dtype
    zero3 = w.teacher_placement == "zero3" or (w.teacher_placement == "auto" and stage == 3)
    if not zero3:
        return t.total_params * dtype, dtype
    gathered = 2 * t.layer_params * dtype  # the layer in use and the prefetched next one
    if w.teacher_offload:
        return gathered, dtype
    return t.total_params * dtype // w.num_gpus + gathered, dtype


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
        head_bytes = master
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
        head_bytes = model_bytes
    act_bytes = 2 if mixed else master
    stream_bytes = master if s == 0 else act_bytes  # autocast keeps the residual stream in fp32
    tokens = setup.micro_batch * w.seq_len
    saved, backward_extra = student_activation_bytes(
        student, tokens, setup.gradient_checkpointing, act_bytes, stream_bytes
    )
    workspace, loss_grads = loss_bytes(student, teacher, tokens, w, head_bytes)
    t_weights, t_kept, t_working = 0, 0, 0
    if teacher is not None:
        t_weights, t_bytes = _teacher_weight_bytes(teacher, w, s)
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
