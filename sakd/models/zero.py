"""Models under DeepSpeed ZeRO-3: built whole (not partitioned by ``zero.Init``), partition status of a
parameter, and parameters a module's forward uses without calling their module."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


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
