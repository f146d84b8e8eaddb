"""The end of a launched run: every rank leaves the gloo process group together, so no rank aborts at exit.

A process that exits with the group alive can die at interpreter shutdown ("terminate called without an
active exception", SIGABRT; pytorch/pytorch#190489), and the launcher reports the finished run as failed --
CI lost two 2-rank Trainer runs to it. With ``stay`` the worker below ends that way: 5 of 6 launches of 6
ranks failed on this machine (``tests/workers/leave_worker.py``); after ``leave_process_group`` none did.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sakd.training.distributed import leave_process_group

ROOT = Path(__file__).parents[1]
WORKER = ROOT / "tests" / "workers" / "leave_worker.py"
RANKS = 6


@pytest.mark.multiprocess
def test_every_rank_exits_cleanly_after_leaving(tmp_path):
    """2 launches of 6 ranks (each would fail with probability ~5/6 without leaving): every one exits 0,
    every rank's collective was right and its group is gone afterwards."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(RANKS)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for launch in range(2):
        out = tmp_path / str(launch)
        out.mkdir()
        proc = subprocess.run(
            [*cmd, str(WORKER), str(out)], capture_output=True, text=True, env=env, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        for rank in range(RANKS):
            record = json.loads((out / f"rank{rank}.json").read_text())
            assert record == {"gathered": [float(r) for r in range(RANKS)], "initialized_after": False}


def test_leaving_outside_a_launch_keeps_an_in_process_group(tmp_path, monkeypatch):
    """A group this process set up itself (world 1, no launcher) is not ours to destroy."""
    import torch.distributed as dist

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        leave_process_group()
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()
