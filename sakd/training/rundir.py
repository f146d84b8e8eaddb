"""The run directory: fresh start or resume, never mixing two runs, and the metrics log."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from accelerate import Accelerator

from sakd.errors import RunDirError
from sakd.training import checkpoint


def prepare(accelerator: Accelerator, run_dir: Path, resume: str, overwrite: bool) -> Path | None:
    """Decide fresh start / resume; refuse to mix runs. Returns the checkpoint to resume from."""
    acc = accelerator
    resume_from: Path | None = None
    if resume not in ("auto", "none"):
        resume_from = Path(resume)
        if not (resume_from / checkpoint.STATE_FILE).is_file():
            raise RunDirError(f"--resume {resume}: not a complete sakd checkpoint directory")
        if why := checkpoint.problem(resume_from):
            raise RunDirError(f"--resume {resume}: damaged checkpoint ({why})")
    elif resume == "auto" and not overwrite:
        resume_from = checkpoint.latest(run_dir / "checkpoints")
    if resume_from is None and run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise RunDirError(
                f"output directory {run_dir} already holds a run with no checkpoint to resume; "
                "pass --overwrite to replace it or choose another training.output_dir"
            )
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(run_dir)
    acc.wait_for_everyone()
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        # A finished run's marker goes first: a resumed or restarted run is not finished.
        (run_dir / "summary.json").unlink(missing_ok=True)
    acc.wait_for_everyone()
    return resume_from


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines logged after ``step`` (a resumed run logs them again)."""
    if not path.exists():
        return
    keep = [
        ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step
    ]
    path.write_text("".join(k + "\n" for k in keep))
