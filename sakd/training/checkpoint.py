"""Checkpoints: `accelerator.save_state` (model, optimizer, scheduler, scaler, RNG states) plus a JSON
trainer state (step counters, data position), written under a temporary name and renamed into
place once complete, so a crash never leaves a directory that looks like a finished checkpoint.

A checkpoint can still be damaged after the fact (a full disk, a copy cut short, a file removed by
hand). :func:`problem` checks one cheaply -- the files are there and their headers are whole -- and
:func:`latest` skips a damaged one with a warning (it is never deleted: it is evidence).
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import shutil
import struct
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from sakd.errors import CheckpointError

log = logging.getLogger(__name__)


STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^step-(\d{8})$")
# What `save_state` writes for a plain (non-DeepSpeed) model; DeepSpeed writes a `pytorch_model/` engine
# directory instead of the first two.
_REQUIRED = ("model.safetensors", "optimizer.bin", "scheduler.bin")
_DEEPSPEED_DIR = "pytorch_model"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_complete(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (a complete one has its trainer state)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def _safetensors_problem(path: Path) -> str | None:
    """A truncated or garbled safetensors file, from its header alone (no tensor is read)."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return f"{path.name} is truncated"
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            return f"{path.name} is truncated"
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return f"{path.name} has an unreadable header"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    return f"{path.name} is truncated" if 8 + n + end > size else None


def problem(path: Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be resumed from, or None when it looks whole."""
    try:
        json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return f"{STATE_FILE} is missing or unreadable"
    required = _REQUIRED[2:] if (path / _DEEPSPEED_DIR).is_dir() else _REQUIRED
    missing = [name for name in required if not (path / name).is_file()]
    if missing:
        return f"missing {', '.join(missing)}"
    for f in sorted(path.glob("*.safetensors")):
        if why := _safetensors_problem(f):
            return why
    for f in sorted(path.glob("*.bin")):  # torch.save's zip format: a cut-short file has no central directory
        if not zipfile.is_zipfile(f):
            return f"{f.name} is truncated or not a torch file"
    return None


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint that passes :func:`problem`; damaged ones are reported, kept."""
    for path in reversed(list_complete(root)):
        why = problem(path)
        if why is None:
            return path
        log.warning("skipping damaged checkpoint %s (%s); falling back to an older one", path, why)
    return None


def save(
    accelerator: Accelerator,
    root: Path,
    step: int,
    state: dict[str, Any],
    keep_last_n: int,
    protect: Iterable[Path] = (),
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Save everything that determines the next step; all ranks call this.

    ``write_extra(directory)`` (main process only) writes files of our own, such as the EMA weights,
    into the checkpoint before the trainer state marks it complete.

    Afterwards only the ``keep_last_n`` newest whole checkpoints are kept -- but never the one just
    written, nor any in ``protect`` (the one this run resumed from), nor a damaged one.
    """
    final = root / checkpoint_name(step)
    tmp = root / (checkpoint_name(step) + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    # Every rank writes files of its own (RNG states, optimizer shards); one that fails must not leave the
    # others waiting at the next barrier: after each phase all ranks agree on success before going on.
    error = _attempt(lambda: accelerator.save_state(str(tmp), safe_serialization=True))
    if _all_succeeded(accelerator, error) and accelerator.is_main_process:

        def finish_tmp() -> None:
            if write_extra is not None:
                write_extra(tmp)
            # The trainer state is written last: its presence is what marks the checkpoint complete.
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))

        error = _attempt(finish_tmp)
    if not _all_succeeded(accelerator, error):
        # a full disk, a quota, a vanished mount (here or on another rank): drop the partial copy
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        previous = latest(root)
        kept = (
            f"the newest complete checkpoint ({previous.name}) is intact"
            if previous
            else "no checkpoint exists yet"
        )
        why = (error.strerror or str(error)) if error is not None else "the write failed on another process"
        raise CheckpointError(
            f"could not write checkpoint {final.name} to {root}: {why}; {kept} -- free space and "
            "resume with --resume auto"
        )
    if accelerator.is_main_process:
        if final.exists():
            if problem(final) is not None:  # keep a damaged one we are replacing, under another name
                aside = final.with_name(final.name + ".damaged")
                shutil.rmtree(aside, ignore_errors=True)
                final.rename(aside)
            else:
                shutil.rmtree(final)
        tmp.rename(final)
        keep = {final.resolve(), *(Path(p).resolve() for p in protect)}
        whole = [p for p in list_complete(root) if problem(p) is None]
        for old in whole[:-keep_last_n]:
            if old.resolve() not in keep:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _attempt(write: Callable[[], Any]) -> OSError | None:
    """Run one write phase; an OSError is returned (to be agreed on), anything else raises."""
    try:
        write()
    except OSError as e:
        return e
    return None


def _all_succeeded(accelerator: Accelerator, error: OSError | None) -> bool:
    """Whether the phase succeeded on every rank (a collective: all ranks call it)."""
    if accelerator.num_processes == 1:
        return error is None
    failed = torch.tensor(0.0 if error is None else 1.0, device=accelerator.device)
    return float(accelerator.reduce(failed, reduction="sum").item()) == 0.0


def read_state(path: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint, without loading anything else (what must be built first)."""
    return json.loads((Path(path) / STATE_FILE).read_text())


def load(accelerator: Accelerator, path: Path) -> dict[str, Any]:
    """Restore a checkpoint written by :func:`save`; returns the trainer state.

    Accelerate reads the optimizer, scheduler and RNG files with ``torch.load(weights_only=True)``, so a
    planted pickle cannot run code; it is refused in one line (DeepSpeed's own engine checkpoints are
    pickles DeepSpeed loads itself: resume only from checkpoints your runs wrote).
    """
    try:
        accelerator.load_state(str(path))
    except (pickle.UnpicklingError, RuntimeError, OSError, KeyError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot resume from {path}: {first}") from None
    return json.loads((path / STATE_FILE).read_text())
