"""Run by tests/test_distributed_exit.py under torchrun: one collective on a gloo group, then the end of a
launched command -- ``leave_process_group`` (or, with ``stay``, an exit with the group alive, which aborts
some ranks at interpreter shutdown; with ``stopped``, ``sakd``'s ``main()`` ending a command that stopped on
SIGTERM: exit 143). Each rank writes ``OUT_DIR/rankN.json``: whether the group was still
set up after leaving.

    python -m torch.distributed.run --nproc_per_node 6 tests/workers/leave_worker.py OUT_DIR [stay]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from sakd.training.distributed import leave_process_group

if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    gathered = [torch.empty(1) for _ in range(world)]
    dist.all_gather(gathered, torch.tensor([float(rank)]))
    code = 0
    if sys.argv[2:] == ["stopped"]:
        from sakd.commands.main import _leaving

        code = _leaving(143)
    elif sys.argv[2:] != ["stay"]:
        leave_process_group()
    record = {"gathered": [t.item() for t in gathered], "initialized_after": dist.is_initialized()}
    Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps(record))
    sys.exit(code)
