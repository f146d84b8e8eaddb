"""The inputs of a memory estimate -- the setup the planner varies (:class:`Setup`) and what the recipe
fixes (:class:`Workload`) -- and the per-component byte formulas :func:`sakd.planner.estimate.estimate`
adds up (the accounting is in :mod:`sakd.planner.estimate`'s docstring)."""

from __future__ import annotations

from dataclasses import dataclass

from sakd.config import RunConfig
from sakd.losses.chunk_size import resolve_chunk_size
from sakd.losses.logit_grads import block_rows
from sakd.planner.sizes import ModelNumbers

GIB = 1024**3
OVERHEAD_BYTES = 3 * GIB // 4
"""CUDA context (~0.3-0.5 GiB with PyTorch's kernels loaded), cuBLAS and NCCL workspaces, and slack
for the caching allocator's fragmentation: 0.75 GiB per GPU."""


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
    for the hidden states and ``[Vs, Hs]`` for the head, in the head's dtype (float32 for fp16:
    :mod:`sakd.losses.stored_grads`)."""
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
    writer = teacher if teacher is not None and teacher_writes else student  # (narrowed for the type checker)
    cache_dtype = DTYPE_BYTES[w.teacher_dtype] if teacher_writes else act_bytes
    cache = kv_cache_bytes(writer, setup.micro_batch, w.generated_seq_len, cache_dtype)
    logits = 3 * setup.micro_batch * writer.vocab * 4
    gathered = 0
    if setup.stage == 3 and not teacher_writes:
        model_bytes = 2 if w.mixed_precision in ("fp16", "bf16") else DTYPE_BYTES[w.student_dtype]
        gathered = student.total_params * model_bytes * (w.num_gpus - 1) // w.num_gpus
    return cache + logits + gathered


def teacher_weight_bytes(t: ModelNumbers, w: Workload, stage: int) -> tuple[int, int]:
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
