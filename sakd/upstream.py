"""The few private APIs of our dependencies that sakd relies on, each behind one documented helper.

Each helper says what it touches and why no public API does the job; ``tests/test_upstream.py`` checks
each against the installed version, so an upstream change fails loudly there instead of silently in a run.

=========================  ===============================================================================
helper                     private API
=========================  ===============================================================================
:func:`forget_prepared`    accelerate ``Accelerator._optimizers`` / ``_schedulers`` (lists of what
                           ``prepare`` returned, which ``save_state`` checkpoints)
:func:`set_process_world`  accelerate ``PartialState._shared_state`` / ``AcceleratorState._shared_state``
:func:`attn_implementation` transformers ``PretrainedConfig._attn_implementation``
:func:`zero3_gathered`     DeepSpeed ``param.ds_status`` / ``ZeroParamStatus`` (``ds_id`` marks a ZeRO-3 param)
:func:`dataset_fingerprint` datasets ``Dataset._fingerprint`` (the content hash its cache files are named by)
:func:`zero3_whole_for_generation` DeepSpeed ``deepspeed.runtime.zero.stage3.unwrap_model_for_generation``
                           (not exported at the top level; it removes and re-registers the engine's hooks)
:func:`default_store`      torch ``distributed_c10d._get_default_store`` (the default group's key-value store)
=========================  ===============================================================================
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


def forget_prepared(accelerator: Any, optimizer: Any, scheduler: Any) -> None:
    """Drop an optimizer and its scheduler from what ``accelerator.save_state`` checkpoints.

    Multi-stage training replaces both at a stage start; Accelerate has no public way to un-prepare
    them, and without this every later checkpoint would also hold the finished stages' states.
    """
    accelerator._optimizers.remove(optimizer)
    accelerator._schedulers.remove(scheduler)


def release_engine(accelerator: Any, engine: Any, optimizer: Any, scheduler: Any) -> Any:
    """Drop a prepared DeepSpeed engine, its optimizer and scheduler from the accelerator, free the engine
    (its gradient hooks and buffers: ``engine.destroy()``) and return the module it wrapped, to be prepared
    again with another optimizer. Accelerate can free everything (``free_memory``) but not one engine."""
    forget_prepared(accelerator, optimizer, scheduler)
    accelerator._models.remove(engine)
    accelerator.deepspeed_engine_wrapped = None
    engine.destroy()
    return engine.module


def set_process_world(num_processes: int, process_index: int, local_process_index: int) -> None:
    """Make Accelerate's shared process state report this world (the CPU DeepSpeed repair).

    Accelerate keeps rank/world in class-level shared dicts (Borg pattern) and offers no setter.
    """
    from accelerate.state import AcceleratorState, PartialState

    for shared in (PartialState._shared_state, AcceleratorState._shared_state):
        shared.update(
            num_processes=num_processes, process_index=process_index, local_process_index=local_process_index
        )


def attn_implementation(config: Any) -> str | None:
    """The attention kernel a transformers config selects (``sdpa``, ``eager``, a registered name).

    transformers 5.x stores it as ``config._attn_implementation``; its public setter is
    ``model.set_attn_implementation`` but there is no public getter.
    """
    return getattr(config, "_attn_implementation", None)


def zero3_gathered(param: torch.Tensor) -> bool:
    """Whether a parameter is whole on this rank: not a ZeRO-3 parameter, or one gathered right now."""
    if not hasattr(param, "ds_id"):
        return True
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return param.ds_status == ZeroParamStatus.AVAILABLE


def dataset_fingerprint(ds: Any) -> str:
    """The fingerprint `datasets` keeps for a dataset: a hash of where it came from and every transform
    applied since (file contents for a loaded file). The packing names its own cache entries from it
    (``map(new_fingerprint=...)``), so a second run on the same text reuses them; `datasets` exposes it
    only as ``Dataset._fingerprint``."""
    return ds._fingerprint


@contextlib.contextmanager
def zero3_whole_for_generation(engine: Any) -> Iterator[Any]:
    """A ZeRO-3 training engine with every parameter gathered and its per-layer hooks removed, for a
    generation loop that runs many small forwards.

    DeepSpeed ships this for RLHF generation (TRL uses it) in ``deepspeed.runtime.zero.stage3``, outside its
    documented API: it enters ``GatheredParameters`` over the whole model, removes the parameter-offload
    forward/backward hooks (which would otherwise re-gather and release each layer at every token) and
    re-registers them on exit. Every rank must enter it together (the gather is a collective).
    """
    from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

    with unwrap_model_for_generation(engine) as model:
        yield model


def default_store() -> Any:
    """The key-value store ``torch.distributed``'s default group was set up with (the launcher's rendezvous
    store under torchrun / ``accelerate launch``). torch has no public getter for it; the exit handshake of
    :func:`sakd.training.distributed.leave_process_group` needs a channel other than the group's sockets."""
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()
