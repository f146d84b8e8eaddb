"""Run examples/hf_trainer.py under ``torchrun`` on CPU with DeepSpeed.

Accelerate 1.15 reports ``num_processes == 1`` on every rank of a DeepSpeed run without CUDA, although
DeepSpeed set up a real 2-process group (``sakd distill`` repairs this in
:func:`sakd.training.distributed.build_accelerator`). ``TrainingArguments`` reads the world size as soon as
it sets up its process state -- to fill the DeepSpeed config's ``train_batch_size`` and to shard the data
-- so this worker repairs the state right where Accelerate builds it, then runs the example unchanged.
On GPUs Accelerate gets the world right and the example needs none of this. After training each rank
writes ``OUTPUT_DIR/rankN.json``: the world it trained in and how much of each model it holds.

    python -m torch.distributed.run --nproc_per_node 2 tests/workers/hf_trainer_worker.py EXAMPLE_ARGS...
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import torch.distributed as dist
from accelerate.state import PartialState
from dist_worker import _held

from sakd.integrations import DistillationTrainer

EXAMPLE = Path(__file__).parents[2] / "examples" / "hf_trainer.py"


def _with_the_real_world(init):
    def wrapped(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if dist.is_initialized() and self.num_processes != dist.get_world_size():
            # what sakd.upstream.set_process_world does, before any AcceleratorState exists
            self._shared_state.update(
                num_processes=dist.get_world_size(),
                process_index=dist.get_rank(),
                local_process_index=dist.get_rank(),
            )

    return wrapped


def _recording(train):
    def wrapped(self, *args, **kwargs):
        out = train(self, *args, **kwargs)
        teacher = getattr(self.teacher, "module", self.teacher)
        record = {
            "world": self.accelerator.num_processes,
            "rank": self.accelerator.process_index,
            "teacher": type(self.teacher).__name__,
            "teacher_held": _held(teacher),
            "student_held": _held(self.student),
        }
        Path(self.args.output_dir, f"rank{dist.get_rank()}.json").write_text(json.dumps(record))
        return out

    return wrapped


if __name__ == "__main__":
    PartialState.__init__ = _with_the_real_world(PartialState.__init__)
    DistillationTrainer.train = _recording(DistillationTrainer.train)
    sys.argv = [str(EXAMPLE), *sys.argv[1:]]
    runpy.run_path(str(EXAMPLE), run_name="__main__")
