"""Run by the multiprocess tests under a launcher (torchrun): train a recipe and record, per rank, what
that rank really saw and held -- the tests assert on these files, not on what Accelerate reports.

    python -m torch.distributed.run --nproc_per_node 2 tests/workers/dist_worker.py RECIPE.json OUT_DIR [RESUME]

RESUME (default none) is passed to the trainer as --resume is.

Fault injection for the reliability tests (environment variables, read here only):
  SAKD_TEST_POISON=STEP:RANK   that rank's first micro-batch of optimizer step STEP has a NaN loss;
  SAKD_TEST_FAIL_SAVE=RANK     that rank's checkpoint writes fail with "No space left on device".
"""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from sakd.config import load_config
from sakd.training.distributed import leave_process_group
from sakd.training.trainer import Distiller


def _held(model: torch.nn.Module) -> tuple[int, int]:
    """(elements this rank stores, elements of the whole model) -- ZeRO-3 partitions carry ds_tensor."""
    mine = full = 0
    seen = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if hasattr(p, "ds_tensor"):
            mine, full = mine + p.ds_tensor.numel(), full + p.ds_numel
        else:
            mine, full = mine + p.numel(), full + p.numel()
    return mine, full


def main() -> None:
    recipe, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    cfg, _ = load_config(recipe)
    resume = sys.argv[3] if len(sys.argv) > 3 else "none"
    d = Distiller(cfg, resume=resume, overwrite=resume == "none")
    start = d.state.step
    seen: list[list[int]] = []
    original = d._micro_batches

    def recording() -> list[dict[str, torch.Tensor]]:
        batches = original()
        seen.append(sorted(int(i) for mb in batches for i in mb["sample_ids"].reshape(-1)))
        return batches

    d._micro_batches = recording
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    _inject_faults(d, rank)
    try:
        summary = d.train()
    except Exception as e:  # the reliability tests assert on the one line every rank ends with
        (out / f"rank{rank}.error").write_text(f"{type(e).__name__}: {e}")
        raise SystemExit(2) from None
    teacher = getattr(d.teacher, "module", d.teacher)
    record = {
        "rank": rank,
        "world": world,
        "accelerate_rank": d.accelerator.process_index,
        "accelerate_world": d.accelerator.num_processes,
        "zero_stage": d.zero_stage,
        "teacher_placement": d.teacher_placement,
        "start_step": start,
        "samples": seen,
        "prepared_models": len(d.accelerator._models),  # the teacher is never prepared (nor checkpointed)
        "student_held": _held(d.hf_student),
        "teacher_held": _held(teacher),
        "summary": summary,
    }
    (out / f"rank{record['rank']}.json").write_text(json.dumps(record))
    leave_process_group()


def _inject_faults(d: Distiller, rank: int) -> None:
    if poison := os.environ.get("SAKD_TEST_POISON"):
        step, poisoned_rank = map(int, poison.split(":"))
        loss_fn, calls = d._student_loss, {"n": 0}

        def poisoned(student, mb, teacher_out, temperature, **objective_kwargs):
            out = loss_fn(student, mb, teacher_out, temperature, **objective_kwargs)
            first = calls["n"] == 0
            calls["n"] += 1
            if rank == poisoned_rank and d.state.step == step and first:
                out.loss_sum = out.loss_sum * float("nan")
            return out

        d._student_loss = poisoned
        step_fn = d.train_step

        def counting(micro_batches):
            calls["n"] = 0
            return step_fn(micro_batches)

        d.train_step = counting
    if os.environ.get("SAKD_TEST_FAIL_SAVE") == str(rank):

        def full_disk(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        d.accelerator.save_state = full_disk


if __name__ == "__main__":
    main()
