"""Distribution glue for the loop: the run's ``Accelerator`` and the process world.

Accelerate owns the student (DDP, or a DeepSpeed engine through ``accelerator.prepare``). This module
holds what Accelerate does not do for us, each piece small and tested:

* :func:`build_accelerator` -- DeepSpeed when ``training.deepspeed`` (or the accelerate config) asks for
  it, with the JSON's ``"auto"`` values filled (:mod:`sakd.config.deepspeed`);
* :func:`repair_cpu_world` -- Accelerate 1.15 reports ``num_processes == 1`` on every rank of a
  DeepSpeed run without CUDA (its backend detection only knows accelerators), although DeepSpeed set up
  a real multi-process group; we take the world from ``torch.distributed`` itself;
* :func:`stop_if_a_peer_dies` -- when another rank dies (SIGKILL, the OOM killer, a lost machine), the
  survivors' collectives fail (:func:`peer_lost` tells that apart); they stop with one line that says so
  and which checkpoint the same command resumes from, not the backend's traceback;
* :func:`leave_process_group` -- at the end of a command every rank destroys the process group together,
  so that no rank aborts at exit (gloo's threads outliving the interpreter);
* :func:`check_cuda_arch` -- a GPU whose architecture the installed PyTorch has no kernels for (a P100
  under a CUDA 12.8+ wheel) stops the run at start with the fix, instead of failing in the first kernel.

The teacher's placement is :mod:`sakd.teacher.placement`; ZeRO-3 parameter handling :mod:`sakd.models.zero`.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from sakd.config import RunConfig
from sakd.config.deepspeed import run_ds_config
from sakd.errors import SetupError, TrainingError
from sakd.training import checkpoint
from sakd.upstream import default_store, set_process_world


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


def repair_cpu_world(accelerator: Any) -> bool:
    """Make Accelerate's rank/world match ``torch.distributed`` when they disagree (CPU DeepSpeed runs).

    Returns True when it changed anything. Only ranks and counts are corrected: Accelerate's collective
    helpers (reduce, gather, wait_for_everyone) already go through ``torch.distributed`` for a DeepSpeed
    run, so they become correct with them.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    world, rank = dist.get_world_size(), dist.get_rank()
    if accelerator.num_processes == world and accelerator.process_index == rank:
        return False
    set_process_world(world, rank, int(os.environ.get("LOCAL_RANK", rank)))
    return True


# What a collective raises on a rank whose peer is gone: gloo's sockets to it close ("Connection reset by
# peer", "Connection closed by peer", a broken pipe) or its wait times out; NCCL aborts the communicator.
_PEER_GONE = ("by peer", "Broken pipe", "Timed out waiting", "communicator was aborted")


def peer_lost(error: BaseException) -> str | None:
    """Why a collective failed when ``error`` says another process of the run died or stopped answering
    (gloo raises a plain RuntimeError, NCCL a DistBackendError), else None."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or not isinstance(error, RuntimeError):
        return None
    text = str(error).strip()
    if not (isinstance(error, dist.DistError) or any(s in text for s in _PEER_GONE)):
        return None
    first = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0] if text else type(error).__name__)
    return first.split(". ")[0]  # gloo's own line adds advice about remote workers and "GLHF"


@contextlib.contextmanager
def stop_if_a_peer_dies(checkpoints: Path) -> Iterator[None]:
    """Turn a collective's failure for a dead or silent peer into a one-line :class:`TrainingError` that
    names the newest complete checkpoint under ``checkpoints``; any other error passes unchanged."""
    try:
        yield
    except RuntimeError as e:
        if (why := peer_lost(e)) is None:
            raise
        newest = checkpoint.latest(checkpoints)
        resume = f"the newest complete checkpoint is {newest}" if newest else "no checkpoint exists yet"
        raise TrainingError(
            f"another process of this run died or stopped answering ({why}); {resume} -- run the same "
            "command again to resume"
        ) from None


def leave_process_group(timeout_s: float = 300.0) -> None:
    """Destroy ``torch.distributed``'s default group at the end of a launched command, all ranks together.

    A process that exits with the group alive can abort while the interpreter shuts down ("terminate called
    without an active exception", SIGABRT: gloo's worker threads outlive it; pytorch/pytorch#190489), and the
    launcher then reports a finished run as failed -- 2 of 10 plain 2-rank gloo launches here. Destroying right
    after the last collective is not enough either: a rank that closes its sockets while a peer still reads
    that collective's reply resets the peer's connection. So every rank first counts itself out through the
    launcher's store (not the group's sockets), and destroys the group once all have. Does nothing outside
    a launched multi-process run, so an in-process caller's group is left alone. Best effort: a peer that is
    gone or a store that is closed leaves the exit as it was.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or world_from_env() < 2:
        return
    world, rank, timeout = dist.get_world_size(), dist.get_rank(), datetime.timedelta(seconds=timeout_s)
    try:
        dist.barrier()
    except RuntimeError:  # a peer is gone: nothing to leave together
        return
    try:
        store = default_store()
        # the last rank to count itself out opens the gate; the others wait for it
        if int(store.add("sakd/leave/count", 1)) == world:
            store.set("sakd/leave/open", "1")
        else:
            store.wait(["sakd/leave/open"], timeout)
        # rank 0 leaves last: without torchrun's agent (the deepspeed launcher, mpirun) it hosts the store
        if rank != 0:
            if int(store.add("sakd/leave/passed", 1)) == world - 1:
                store.set("sakd/leave/all_passed", "1")
        else:
            store.wait(["sakd/leave/all_passed"], timeout)
    except RuntimeError:  # the store is gone or a peer stopped answering; every rank did finish the barrier
        pass
    dist.destroy_process_group()


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
