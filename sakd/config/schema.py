"""The typed, documented config tree of a sakd run: one dataclass per section.

Every field carries a help string (``metadata["help"]``) used by ``sakd config-reference`` and the
README, and optional range checks (``min``, ``max``, ``gt``, ``lt`` and ``choices``) that
:mod:`sakd.config.loader` applies when a recipe is read.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from sakd.config.aux_schema import AttentionConfig, ContrastiveConfig, FeatureConfig
from sakd.config.aware_schema import CurriculumConfig, MoEConfig, TokenRouterConfig
from sakd.config.cache_schema import CacheConfig
from sakd.config.data_schema import SAMPLE_BY, DataConfig  # noqa: F401  (SAMPLE_BY: re-exported)
from sakd.config.fields import documented as _f
from sakd.config.generation import POLICIES, GenerationConfig
from sakd.config.peft_schema import PeftConfig


@dataclass
class ModelConfig:
    teacher: str = _f(
        "tiny-moe",
        "Teacher: a built-in preset name (tiny-moe, tiny-dense, huihui-moe-1.2b, smollm-135m), a local "
        "Hugging Face model directory, or a hub id (loaded with from_pretrained).",
    )
    student: str = _f("tiny-dense", "Student: a preset name, a local model directory, or a hub id.")
    tokenizer: str | None = _f(
        None,
        "Student tokenizer (directory or hub id). Default: the student's directory. Required when the "
        "student is a preset (presets take their vocabulary size from it).",
    )
    teacher_tokenizer: str | None = _f(
        None,
        "Teacher tokenizer. Default: the teacher's directory, or `tokenizer` when the teacher is a preset.",
    )
    teacher_dtype: str = _f(
        "float32",
        "dtype the frozen teacher is loaded in (fp32 on CPU; float16 on a P100; bfloat16 on Ampere+).",
        choices=["float32", "float16", "bfloat16"],
    )
    student_dtype: str = _f(
        "float32",
        "dtype of the student's master weights (keep float32 and use training.mixed_precision for speed).",
        choices=["float32", "float16", "bfloat16"],
    )
    trust_remote_code: bool = _f(
        False, "Allow model/tokenizer code from the model repository to run. Off unless you trust it."
    )
    gradient_checkpointing: bool = _f(False, "Recompute student activations in backward to save memory.")
    attn_implementation: str | None = _f(
        None, "Attention kernel passed to transformers (sdpa, eager, flash_attention_2). Default: theirs."
    )
    teacher_quantization: str = _f(
        "none",
        "Load the frozen teacher quantized by bitsandbytes: 8bit or 4bit (nf4). CUDA only; replicated placement.",
        choices=["none", "8bit", "4bit"],
    )
    teacher_placement: str = _f(
        "auto",
        "replicated: a full frozen copy per process; zero3: partitioned by its own inference-only DeepSpeed "
        "ZeRO-3 engine (parameters gathered on use); auto: zero3 when the student runs ZeRO-3, else replicated.",
        choices=["auto", "replicated", "zero3"],
    )
    teacher_offload: bool = _f(
        False,
        "With a ZeRO-3 teacher: keep its partitioned parameters in CPU memory (slower, less GPU memory).",
    )
    chat_template: str = _f(
        "student",
        "data.format=chat: the chat template the student renders conversations with, in training, evaluation and "
        "its export. student = its tokenizer's own; teacher = the teacher tokenizer's (e.g. a base student "
        "whose tokenizer has none: the template's special tokens should be in the student's vocabulary).",
        choices=["student", "teacher"],
    )
    peft: PeftConfig = field(
        default_factory=PeftConfig, metadata={"help": "Train the student through adapters (LoRA/DoRA)."}
    )


@dataclass
class LossConfig:
    kind: str = _f(
        "fkl",
        "Divergence for the KD term: fkl = KL(teacher||student), rkl = KL(student||teacher), jsd, skl, srkl, tvd.",
        choices=["fkl", "rkl", "jsd", "skl", "srkl", "tvd"],
    )
    alpha: float = _f(
        0.5,
        "Blend: alpha * T^2 * KD + (1 - alpha) * CE. 0 = plain language modelling (no teacher).",
        min=0,
        max=1,
    )
    temperature: float = _f(
        1.0,
        "Softmax temperature applied to both teacher and student logits (off-policy steps; on-policy steps "
        "score at T = 1). 1 by measurement: T = 2 did worse in every seed on the real-teacher quality benchmark "
        "(at alpha 0.9, from a sampled cache; BENCHMARKS.md, 'alpha and T on the real teacher') and made its "
        "sampled cache about 3x larger.",
        gt=0,
    )
    min_temperature: float | None = _f(
        None, "Final temperature of the temperature schedule (None: constant temperature).", gt=0
    )
    temperature_schedule: str = _f(
        "constant",
        "How the temperature moves from `temperature` to `min_temperature` over training.",
        choices=["constant", "linear", "cosine"],
    )
    scale_by_t2: bool = _f(
        True, "Multiply the KD term by T^2 (Hinton et al.) so its gradient scale is T-independent."
    )
    beta: float = _f(0.5, "Generalized JSD interpolation (kind=jsd).", min=0, max=1)
    skew: float = _f(0.1, "Skew for skl/srkl (DistiLLM).", min=0, max=1)
    label_smoothing: float = _f(0.0, "Label smoothing of the CE term.", min=0, max=1)
    sparse: str = _f(
        "none",
        "Sparse teacher signal: none (full distribution), subset (seed's top-k union), topk_tail "
        "(top-k + tail bucket), sampled (unbiased sampled KD).",
        choices=["none", "subset", "topk_tail", "sampled"],
    )
    kd_top_k: int | None = _f(None, "k for the subset / topk_tail sparse modes.", min=1)
    num_samples: int = _f(64, "Teacher samples per token for sparse=sampled.", min=1)
    fused: bool = _f(
        True,
        "Compute the loss from hidden states chunk by chunk, never building [batch, seq, vocab] logits, with "
        "gradients in closed form where there is one. false: a reference path on full logits (CE alone: "
        "autograd on chunks, rebuilt in backward; under ZeRO-3 kept).",
    )
    chunk_size: int | str = _f(
        "auto",
        "Tokens per chunk of the fused loss, or auto: chunks whose logits are about as large as the hidden "
        "states (Liger-Kernel's rule, at least 128 tokens), so the loss's memory stays a small fixed share "
        "of materialized logits at any batch size (README, Fused loss).",
    )


@dataclass
class AlignmentConfig:
    mode: str = _f(
        "auto",
        "auto: align positions by text and map vocabularies only when the tokenizers differ; always: take "
        "the aligned path even for identical tokenizers (it then equals plain KD; a check).",
        choices=["auto", "always"],
    )
    chain_rule: bool = _f(
        True,
        "Score a student token that the teacher spells with several tokens by the chain rule over "
        "those teacher tokens (GOLD-style) instead of by the projection alone.",
    )
    uld_weight: float = _f(
        0.0,
        "Weight of an extra ULD term (sorted-probability distance) on the unmapped vocabulary remainder.",
        min=0,
    )
    cache_dir: str | None = _f(
        None, "Vocabulary-map cache directory (None: $SAKD_CACHE_DIR/vocab_maps or ~/.cache/sakd/vocab_maps)."
    )


@dataclass
class DistillationConfig:
    loss: LossConfig = field(default_factory=LossConfig, metadata={"help": "The distillation objective."})
    alignment: AlignmentConfig = field(
        default_factory=AlignmentConfig, metadata={"help": "Teacher and student with different tokenizers."}
    )
    feature: FeatureConfig = field(default_factory=FeatureConfig, metadata={"help": "Hidden-state loss."})
    attention: AttentionConfig = field(
        default_factory=AttentionConfig, metadata={"help": "Attention transfer."}
    )
    contrastive: ContrastiveConfig = field(
        default_factory=ContrastiveConfig, metadata={"help": "Sequence-level contrastive loss."}
    )
    teacher_cache: str | None = _f(
        None,
        "Train from this offline teacher cache (a directory written by `sakd cache-teacher`) instead of "
        "running the teacher: it is never loaded. The cache must match the recipe's teacher, teacher "
        "tokenizer and training documents; the student may use another tokenizer.",
    )
    cache: CacheConfig = field(
        default_factory=CacheConfig, metadata={"help": "What `sakd cache-teacher` stores."}
    )
    moe: MoEConfig = field(
        default_factory=MoEConfig, metadata={"help": "MoE-aware teacher signals (Kim et al. 2025)."}
    )
    router: TokenRouterConfig = field(
        default_factory=TokenRouterConfig, metadata={"help": "The student-aware token router."}
    )
    curriculum: CurriculumConfig = field(
        default_factory=CurriculumConfig, metadata={"help": "Loss phases and magnitude balancing."}
    )
    policy: str = _f(
        "off",
        "Whose text the student learns on: off (the data: off-policy KD), on (its own samples of prompts, "
        "scored by the teacher: on-policy KD, the divergence of distillation.loss at T = 1 without T^2 on "
        "the generated tokens only, with alpha = 1 on those steps), mixed (a share "
        "generation.fraction of steps on-policy: GKD), sequence (the teacher's samples: sequence-level KD). "
        "See distillation.generation.",
        choices=list(POLICIES),
    )
    generation: GenerationConfig = field(
        default_factory=GenerationConfig,
        metadata={"help": "Sampling, prompts and evaluation of on-policy / sequence-level distillation."},
    )


@dataclass
class StageConfig:
    name: str = _f("", "Label of the stage in logs and metrics.jsonl (default: stage-N).")
    steps: int | None = _f(None, "Optimizer steps of the stage (or give epochs).", min=1)
    epochs: float | None = _f(None, "Passes over the training blocks, when steps is not given.", gt=0)
    learning_rate: float | None = _f(
        None, "Peak learning rate of the stage (default: optimization.learning_rate).", gt=0
    )
    lr_multipliers: dict[str, float] | None = _f(
        None, "Parameter rules of the stage, as optimization.lr_multipliers (default: those); 0.0 freezes."
    )
    warmup_steps: int | None = _f(None, "Warm-up of the stage (default: optimization.warmup_steps).", min=0)


@dataclass
class OptimizationConfig:
    optimizer: str = _f(
        "adamw",
        "Student optimizer: adamw (torch), adamw_8bit / paged_adamw_8bit (bitsandbytes), ds_cpu_adam "
        "(DeepSpeed's CPU Adam, for ZeRO optimizer offload). See README, Scaling out, for the compatibility table.",
        choices=["adamw", "adamw_8bit", "paged_adamw_8bit", "ds_cpu_adam"],
    )
    learning_rate: float = _f(3e-4, "Peak learning rate.", gt=0)
    weight_decay: float = _f(0.01, "Decoupled weight decay.", min=0)
    adam_beta1: float = _f(0.9, "Adam beta1.", min=0, max=1)
    adam_beta2: float = _f(0.95, "Adam beta2.", min=0, max=1)
    adam_epsilon: float = _f(1e-8, "Adam epsilon.", gt=0)
    lr_scheduler: str = _f(
        "cosine",
        "Schedule (transformers.get_scheduler's names and formulas), defined in optimizer steps.",
        choices=[
            "linear",
            "cosine",
            "constant",
            "constant_with_warmup",
            "cosine_with_min_lr",
            "inverse_sqrt",
        ],
    )
    min_lr_ratio: float = _f(0.1, "Floor of cosine_with_min_lr, as a share of the peak rate.", min=0, max=1)
    warmup_steps: int = _f(0, "Linear warm-up length in optimizer steps.", min=0)
    warmup_ratio: float = _f(
        0.0, "Warm-up as a share of total optimizer steps (used when warmup_steps=0).", min=0, max=1
    )
    max_grad_norm: float | None = _f(1.0, "Clip the global gradient norm to this (None: no clipping).", gt=0)
    lr_multipliers: dict[str, float] = _f(
        {},
        "Regex -> learning-rate multiplier for student parameters, matched with re.search against the "
        "parameter name, first match wins (e.g. {'embed_tokens': 0.0, 'layers\\.0\\.': 0.5}); 0.0 freezes "
        "(requires_grad off, left out of the optimizer); unmatched parameters get 1.0.",
    )
    stages: list[StageConfig] = _f(
        [],
        "Multi-stage training: a list of stages run in order, each with name, steps (or epochs), "
        "learning_rate, lr_multipliers and warmup_steps (unset: the values above). The optimizer and the "
        "LR schedule are created afresh at each stage start; the stages' steps replace training.max_steps. "
        "Example: [{name: head, steps: 500, lr_multipliers: {'^(?!lm_head)': 0.0}}, {name: all, steps: 5000}].",
    )


@dataclass
class TrainingConfig:
    output_dir: str = _f(
        "runs/sakd", "Run directory: config.yaml, metrics.jsonl, checkpoints/, final/, summary.json."
    )
    batch_size: int = _f(8, "Micro-batch size per process (blocks).", min=1)
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.", min=1)
    num_epochs: float = _f(1.0, "Passes over the training blocks (ignored when max_steps is set).", gt=0)
    max_steps: int | None = _f(None, "Optimizer steps to train (overrides num_epochs).", min=1)
    eval_every: int = _f(100, "Evaluate every this many optimizer steps (0: only at the end).", min=0)
    eval_batch_size: int = _f(8, "Batch size for held-out evaluation.", min=1)
    save_every: int = _f(0, "Checkpoint every this many optimizer steps (0: only at the end).", min=0)
    keep_last_n: int = _f(
        2,
        "Checkpoints to keep (never deleted: the newest whole one, the one a run resumed from, damaged ones).",
        min=1,
    )
    max_consecutive_skips: int = _f(
        5,
        "Stop the run after this many optimizer steps in a row skipped for a non-finite loss or gradient norm.",
        min=1,
    )
    ema: bool = _f(
        False,
        "Keep an exponential moving average (EMA) of the student's weights, updated after every optimizer "
        "step that is taken (not after skipped ones) and saved in every checkpoint (ema.safetensors).",
    )
    ema_decay: float = _f(0.999, "EMA decay: ema <- decay * ema + (1 - decay) * weights.", gt=0, lt=1)
    ema_warmup_steps: int = _f(
        10,
        "EMA decay warm-up W: after k optimizer steps the decay is min(ema_decay, (1 + k) / (W + k)), so "
        "early averages are not dominated by the initial weights (W=10 is the usual schedule). 0: constant.",
        min=0,
    )
    eval_with_ema: bool = _f(
        True, "With ema: evaluate (eval_every and the final evaluation) the EMA weights."
    )
    export_ema: bool = _f(
        True,
        "With ema: final/ and `sakd export` hold the EMA weights (false: the raw weights; export --raw).",
    )
    early_stopping_patience: int = _f(
        0,
        "Stop after this many evaluations in a row (eval_every) without the held-out loss improving by "
        "early_stopping_min_delta; final/ then holds the best evaluated checkpoint. 0: off.",
        min=0,
    )
    early_stopping_min_delta: float = _f(
        0.0, "Smallest drop of the held-out eval loss that counts as an improvement.", min=0
    )
    seed: int = _f(42, "Seed for initialisation, data order and sampling.")
    mixed_precision: str = _f(
        "no",
        "Accelerate mixed precision: no, fp16 (P100: loss scaling), bf16.",
        choices=["no", "fp16", "bf16"],
    )
    deepspeed: str | None = _f(
        None,
        'DeepSpeed JSON config (see ds_configs/); its "auto" values are filled from this config. None: '
        "DeepSpeed only if the accelerate config enables it.",
    )


@dataclass
class LoggingConfig:
    log_every: int = _f(10, "Write a metrics.jsonl line every this many optimizer steps.", min=1)
    progress_bar: bool = _f(
        True,
        "Show progress: a tqdm bar with loss, tokens/s and ETA on a terminal; a plain line every `log_every` "
        "steps when output goes to a file or CI.",
    )
    report_to: str = _f(
        "none", "Experiment tracker through Accelerate.", choices=["none", "tensorboard", "wandb"]
    )
    project: str = _f("sakd", "Tracker project name.")


@dataclass
class RunConfig:
    model: ModelConfig = field(
        default_factory=ModelConfig, metadata={"help": "Teacher, student, tokenizers."}
    )
    data: DataConfig = field(
        default_factory=DataConfig, metadata={"help": "Corpus, packing, held-out split."}
    )
    distillation: DistillationConfig = field(
        default_factory=DistillationConfig, metadata={"help": "What the student learns from the teacher."}
    )
    optimization: OptimizationConfig = field(
        default_factory=OptimizationConfig, metadata={"help": "Optimizer and learning-rate schedule."}
    )
    training: TrainingConfig = field(default_factory=TrainingConfig, metadata={"help": "The loop."})
    logging: LoggingConfig = field(default_factory=LoggingConfig, metadata={"help": "Metrics and progress."})


def is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def all_keys(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the config tree."""
    keys = []
    hints = field_types(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if is_dataclass_type(tp):
            keys += all_keys(tp, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


SECTIONS = [f.name for f in dataclasses.fields(RunConfig)]
