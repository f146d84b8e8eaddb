"""Run by the multiprocess composition tests under a launcher (torchrun): train several recipes one after the
other in the same ranks (one launch, many combinations), each a fresh run in its own output directory.

    python -m torch.distributed.run --nproc_per_node 2 tests/workers/recipes_worker.py OUT_DIR NAME...

Reads ``OUT_DIR/NAME.json`` for each NAME and writes ``OUT_DIR/NAME.rankN.json``: the world and ZeRO stage
that rank trained in.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch.distributed as dist
from accelerate.state import AcceleratorState, GradientState

from sakd.config import load_config
from sakd.training.distributed import leave_process_group
from sakd.training.trainer import Distiller


def main() -> None:
    out = Path(sys.argv[1])
    for name in sys.argv[2:]:
        # a fresh Accelerate state for each run (Accelerate keeps one per process, with its DeepSpeed plugin)
        AcceleratorState._reset_state()
        GradientState._reset_state()
        t0 = time.perf_counter()
        cfg, _ = load_config(json.loads((out / f"{name}.json").read_text()))
        d = Distiller(cfg, resume="none", overwrite=True)
        rank = dist.get_rank() if dist.is_initialized() else 0
        d.train()
        record = {
            "world": d.accelerator.num_processes,
            "zero_stage": d.zero_stage,
            "seconds": time.perf_counter() - t0,
        }
        (out / f"{name}.rank{rank}.json").write_text(json.dumps(record))
    leave_process_group()


if __name__ == "__main__":
    main()
