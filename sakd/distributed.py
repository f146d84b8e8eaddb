"""Distribution glue: DeepSpeed configs, the process world, the teacher's placement, parameter gathering.

Accelerate owns the student (DDP, or a DeepSpeed engine through ``accelerator.prepare``). This module
holds what Accelerate does not do for us, each piece small and tested:

* :func:`load_ds_config` / :func:`fill_ds_config` -- read a DeepSpeed JSON and fill its ``"auto"``
  values from the sakd config, so one file serves any batch size, accumulation, clipping or precision;
* :func:`repair_cpu_world` -- Accelerate 1.15 reports ``num_processes == 1`` on every rank of a
  DeepSpeed run without CUDA (its backend detection only knows accelerators), although DeepSpeed set up
  a real multi-process group; we take the world from ``torch.distributed`` itself;
* :func:`check_cuda_arch` -- a GPU whose architecture the installed PyTorch has no kernels for (a P100
  under a CUDA 12.8+ wheel) stops the run at start with the fix, instead of failing in the first kernel;
* :func:`teacher_engine` -- the frozen teacher partitioned by its own optimizer-less ZeRO-3 engine
  (the pattern of Accelerate's multi-model guide and TRL's ``prepare_deepspeed``);
* :func:`register_external_parameters` -- ZeRO-3 gathers parameters a module's forward uses without
  calling their module (the fused loss multiplies by the output head's weight itself).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from sakd.config import ConfigError, RunConfig


def load_ds_config(path: str | Path) -> dict[str, Any]:
    """A DeepSpeed JSON config as a dict (one-line errors for a missing or malformed file)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"training.deepspeed: cannot read {path} ({e.strerror or e})") from None
    try:
        ds = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"training.deepspeed: {path} is not valid JSON (line {e.lineno}: {e.msg})"
        ) from None
    if not isinstance(ds, dict):
        raise ConfigError(f"training.deepspeed: {path} must hold a JSON object")
    return ds


def _fill(section: dict[str, Any], key: str, value: Any) -> None:
    if section.get(key) == "auto":
        section[key] = value


def fill_ds_config(ds: dict[str, Any], cfg: RunConfig, world_size: int | None = None) -> dict[str, Any]:
    """A copy of ``ds`` with every ``"auto"`` we own replaced by the run's value.

    Batch: ``train_micro_batch_size_per_gpu`` = training.batch_size, ``gradient_accumulation_steps`` =
    training.gradient_accumulation_steps, ``train_batch_size`` = their product times the world size (or
    dropped, for DeepSpeed to derive, when the world size is not known yet). ``gradient_clipping`` =
    optimization.max_grad_norm (0: none). ``fp16.enabled`` / ``bf16.enabled`` from
    training.mixed_precision; an explicit true that contradicts it is an error. An ``optimizer`` section
    (DeepSpeed owns the optimizer) takes the learning rate, betas, epsilon and weight decay.
    """
    ds = copy.deepcopy(ds)
    t, o = cfg.training, cfg.optimization
    _fill(ds, "train_micro_batch_size_per_gpu", t.batch_size)
    _fill(ds, "gradient_accumulation_steps", t.gradient_accumulation_steps)
    if ds.get("train_batch_size") == "auto":
        if world_size is None:
            del ds["train_batch_size"]
        else:
            ds["train_batch_size"] = t.batch_size * t.gradient_accumulation_steps * world_size
    _fill(ds, "gradient_clipping", o.max_grad_norm or 0.0)
    for kind in ("fp16", "bf16"):
        section = ds.get(kind)
        if not isinstance(section, dict):
            continue
        wanted = t.mixed_precision == kind
        _fill(section, "enabled", wanted)
        if section.get("enabled") is True and not wanted:
            raise ConfigError(
                f"the DeepSpeed config enables {kind} but training.mixed_precision={t.mixed_precision}; "
                f"set training.mixed_precision={kind} or use a config without {kind}"
            )
        if section.get("enabled") is False and wanted:
            raise ConfigError(
                f"training.mixed_precision={kind} but the DeepSpeed config disables {kind}; set its "
                f'"{kind}": {{"enabled": "auto"}}'
            )
    params = ds.get("optimizer", {}).get("params") if isinstance(ds.get("optimizer"), dict) else None
    if isinstance(params, dict):
        _fill(params, "lr", o.learning_rate)
        _fill(params, "betas", [o.adam_beta1, o.adam_beta2])
        _fill(params, "eps", o.adam_epsilon)
        _fill(params, "weight_decay", o.weight_decay)
    zero = ds.get("zero_optimization")
    if isinstance(zero, dict):  # the export gathers a full state dict from the shards
        _fill(zero, "stage3_gather_16bit_weights_on_model_save", True)
    return ds


def run_ds_config(path: str | Path, cfg: RunConfig, world_size: int | None) -> dict[str, Any]:
    """The DeepSpeed config a run uses: the file, filled (:func:`fill_ds_config`), with the optimizer
    rule for CPU offload applied."""
    ds = fill_ds_config(load_ds_config(path), cfg, world_size)
    if offloads_optimizer(ds):
        if cfg.optimization.optimizer != "ds_cpu_adam":
            raise ConfigError(
                f"{path} offloads the optimizer to the CPU; set optimization.optimizer=ds_cpu_adam "
                f"(got {cfg.optimization.optimizer}), or use a config without offload_optimizer"
            )
        # With this flag on, Accelerate's prepare() rebuilds any client optimizer under offload -- our
        # DeepSpeedCPUAdam included, with adamw_mode=False (L2 instead of decoupled weight decay;
        # accelerate 1.15). DeepSpeed's own check accepts DeepSpeedCPUAdam, so nothing is lost.
        ds["zero_force_ds_cpu_optimizer"] = False
    return ds


def offloads_optimizer(ds: dict[str, Any]) -> bool:
    offload = (ds.get("zero_optimization") or {}).get("offload_optimizer") or {}
    return offload.get("device", "none") not in ("none", None)


def zero_stage(ds: dict[str, Any] | None) -> int:
    if not ds:
        return -1
    return int((ds.get("zero_optimization") or {}).get("stage", 0))


def world_from_env() -> int:
    """The launcher's world size (torchrun, deepspeed, accelerate and mpirun all set one of these)."""
    for key in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 1


def build_accelerator(cfg: RunConfig) -> Any:
    """The run's ``Accelerator``: DeepSpeed when training.deepspeed (or the accelerate config) asks for it,
    with the JSON's "auto" values filled; multi-process CPU runs get the world they really have."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin

    t = cfg.training
    env_ds = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    path = t.deepspeed or (os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") if env_ds else None)
    plugin = None
    if path:
        ds = run_ds_config(path, cfg, world_from_env())
        # zero3_init_flag=False: see built_whole (models are built whole; the engines partition them)
        plugin = DeepSpeedPlugin(hf_ds_config=ds, zero3_init_flag=False)
    # Without CUDA, Accelerate only sets up a multi-process CPU group when told it runs on the CPU; a
    # DeepSpeed run sets up its own group (and gets its world repaired below).
    cpu = not torch.cuda.is_available() and world_from_env() > 1 and plugin is None and not env_ds
    acc = Accelerator(
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        mixed_precision=t.mixed_precision,
        step_scheduler_with_optimizer=False,  # the trainer steps it once per optimizer step
        log_with=None if cfg.logging.report_to == "none" else cfg.logging.report_to,
        project_dir=t.output_dir,
        deepspeed_plugin=plugin,
        cpu=cpu,
    )
    repair_cpu_world(acc)
    return acc


@contextlib.contextmanager
def built_whole(accelerator: Any) -> Iterator[None]:
    """Models built inside are whole, not partitioned by ``zero.Init``.

    Accelerate registers its DeepSpeed config with transformers whatever ``zero3_init_flag`` says, and
    transformers then builds every model under ``zero.Init`` for a ZeRO-3 config -- the teacher
    included, which would leave it partitioned with no engine to gather it. The engines partition what
    they own when they are created instead (each rank holds a whole copy until then).
    """
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def repair_cpu_world(accelerator: Any) -> bool:
    """Make Accelerate's rank/world match ``torch.distributed`` when they disagree (CPU DeepSpeed runs).

    Returns True when it changed anything. Only ranks and counts are corrected: Accelerate's collective
    helpers (reduce, gather, wait_for_everyone) already go through ``torch.distributed`` for a DeepSpeed
    run, so they become correct with them.
    """
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, PartialState

    if not (dist.is_available() and dist.is_initialized()):
        return False
    world, rank = dist.get_world_size(), dist.get_rank()
    if accelerator.num_processes == world and accelerator.process_index == rank:
        return False
    local = int(os.environ.get("LOCAL_RANK", rank))
    for shared in (PartialState._shared_state, AcceleratorState._shared_state):
        shared.update(num_processes=world, process_index=rank, local_process_index=local)
    return True


class SetupError(RuntimeError):
    """This machine cannot run the run as configured (one line, with the fix)."""


def check_cuda_arch() -> None:
    """Stop with the fix when this GPU's architecture has no kernels in the installed PyTorch."""
    if not torch.cuda.is_available():
        return
    major, minor = torch.cuda.get_device_capability()
    arch = f"sm_{major}{minor}"
    built = torch.cuda.get_arch_list()
    if not built or arch in built:
        return
    # PTX for an older architecture JIT-compiles forward (compute_XY runs on >= XY), never backward.
    ptx = [a for a in built if a.startswith("compute_") and int(a.split("_")[1]) <= major * 10 + minor]
    if ptx:
        return
    name = torch.cuda.get_device_name()
    fix = (
        "install a CUDA 12.6 build: pip install torch --index-url https://download.pytorch.org/whl/cu126"
        if major < 7
        else "install a PyTorch build whose arch list includes it"
    )
    raise SetupError(
        f"{name} is {arch}, but this PyTorch {torch.__version__} (CUDA {torch.version.cuda}) has kernels only "
        f"for {' '.join(built)}; {fix}"
    )


def teacher_engine(teacher: torch.nn.Module, student_ds: dict[str, Any], *, offload: bool) -> Any:
    """Partition the frozen ``teacher`` across ranks with an inference-only ZeRO-3 engine.

    The engine has no optimizer; each rank keeps 1/world of every parameter and gathers a layer's
    parameters for its forward. ``offload`` keeps the partitions in CPU memory. Batch keys are copied
    from the student's config (DeepSpeed requires them even without training).
    """
    import deepspeed

    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": student_ds.get("train_micro_batch_size_per_gpu", 1),
        "gradient_accumulation_steps": student_ds.get("gradient_accumulation_steps", 1),
        "zero_optimization": {
            "stage": 3,
            # small parameters (norms, biases, the router) stay whole on every rank: no gather per use
            "stage3_param_persistence_threshold": 10 * teacher.config.hidden_size,
            "stage3_prefetch_bucket_size": 0,
        },
        "zero_allow_untested_optimizer": True,
    }
    if offload:
        ds["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    dtype = next(teacher.parameters()).dtype
    if dtype == torch.float16:
        ds["fp16"] = {"enabled": True}
    elif dtype == torch.bfloat16:
        ds["bf16"] = {"enabled": True}
    engine, *_ = deepspeed.initialize(model=teacher, config=ds)
    engine.eval()
    return engine


def is_partitioned(param: torch.Tensor) -> bool:
    """A ZeRO-3 partitioned parameter (DeepSpeed tags them with ``ds_id``)."""
    return hasattr(param, "ds_id")


def register_external_parameters(owner: torch.nn.Module, *modules: torch.nn.Module | None) -> None:
    """Tell ZeRO-3 that ``owner``'s forward uses the parameters of ``modules`` directly.

    The fused loss multiplies by the output head's weight itself (it never calls the head), so ZeRO-3
    would not gather it. Registered on the module whose forward runs the loss, the parameters are
    gathered for that whole forward -- even a tied embedding that its own module released -- and again
    for its backward, where their gradients go through ZeRO's usual reduce-scatter.
    """
    import deepspeed

    for module in modules:
        for param in module.parameters() if module is not None else ():
            deepspeed.zero.register_external_parameter(owner, param)
