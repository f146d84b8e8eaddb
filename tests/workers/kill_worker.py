"""`sakd` as a rank of a launched run, with one test-only fault: this process SIGKILLs itself (no handler,
no cleanup, as the OOM killer or a lost machine would end it) at a chosen point of the run.

    deepspeed --num_gpus 2 --no_local_rank tests/workers/kill_worker.py distill --config RECIPE ...

SAKD_TEST_KILL=RANK:STEP:WHERE   the rank RANK (torch.distributed's global rank) dies
  WHERE=micro  in optimizer step STEP, in the forward of its second micro-batch -- mid-step: the first
               micro-batch's backward is done, gradients are half accumulated, and the other rank is in
               the step's collectives;
  WHERE=save   inside the checkpoint write of step STEP, once its own files are written: step-STEP.tmp
               then holds every rank's weights, optimizer and RNG files, all but the trainer state
               that marks a checkpoint complete -- half-written, and as close to whole as one gets.
Any other rank runs `sakd` unchanged. The tests (tests/test_distributed_kill.py) resume with plain `sakd`.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from accelerate import Accelerator

from sakd.commands.main import main
from sakd.training.checkpoint import checkpoint_name
from sakd.training.trainer import Distiller


def _die() -> None:
    sys.stderr.write(f"kill_worker: rank {os.environ['RANK']} SIGKILLs itself at {time.time():.3f}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _inject(rank: int, step: int, where: str) -> None:
    if int(os.environ.get("RANK", "0")) != rank:
        return
    if where == "micro":
        loss_fn, calls = Distiller._student_loss, {"step": None, "n": 0}

        def dying(self, *args, **kwargs):
            if calls["step"] != self.state.step:
                calls.update(step=self.state.step, n=0)
            calls["n"] += 1
            if self.state.step == step - 1 and calls["n"] == 2:  # state.step counts finished steps
                _die()
            return loss_fn(self, *args, **kwargs)

        Distiller._student_loss = dying
    elif where == "save":
        save_state = Accelerator.save_state

        def dying_save(self, output_dir=None, **kwargs):
            written = save_state(self, output_dir, **kwargs)
            if output_dir is not None and Path(output_dir).name == checkpoint_name(step) + ".tmp":
                _die()
            return written

        Accelerator.save_state = dying_save
    else:
        raise SystemExit(f"SAKD_TEST_KILL: WHERE must be micro or save, got {where!r}")


if __name__ == "__main__":
    if spec := os.environ.get("SAKD_TEST_KILL"):
        r, s, w = spec.split(":")
        _inject(int(r), int(s), w)
    sys.exit(main(sys.argv[1:]))
