"""Checkpoints: `accelerator.save_state` (model, optimizer, scheduler, scaler, RNG states) plus a JSON
trainer state (step counters, data position), written under a temporary name and renamed into
place once complete, so a crash never leaves a directory that looks like a finished checkpoint."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^step-(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_complete(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (a complete one has its trainer state)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest(root: Path) -> Path | None:
    done = list_complete(root)
    return done[-1] if done else None


def save(accelerator: Accelerator, root: Path, step: int, state: dict[str, Any], keep_last_n: int) -> Path:
    """Save everything that determines the next step; all ranks call this."""
    final = root / checkpoint_name(step)
    tmp = root / (checkpoint_name(step) + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # The trainer state is written last: its presence is what marks the checkpoint complete.
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_complete(root)[:-keep_last_n]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load(accelerator: Accelerator, path: Path) -> dict[str, Any]:
    """Restore a checkpoint written by :func:`save`; returns the trainer state."""
    accelerator.load_state(str(path))
    return json.loads((path / STATE_FILE).read_text())
