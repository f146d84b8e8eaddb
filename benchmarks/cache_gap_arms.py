"""Controlled cache-vs-live arms on the issue-23 tiny setup (reuses sakd bench quality's run functions): needs
the grid of BENCHMARKS.md "Quality benchmark" in /tmp/i23g/grid (its teacher, split and tokenizer).
usage: arms.py ARM [ARM...]  with ARM like live | topk_tail:k64:float16 | sampled:n64 | ...  (seeds 0..2)
env: EPOCHS (100), ALPHA (0.9), T (1), SEEDS (0,1,2), KEEP=1 keeps the final student"""

import json
import os
import sys
import time
from pathlib import Path

from sakd.commands import quality_runs as qr
from sakd.commands.cache_teacher import write_cache
from sakd.config import load_config

G = Path("/tmp/i23g/grid")
OUT = Path(os.environ.get("OUT", "/tmp/s2cg"))
setup = qr.Setup(
    str(G / "teacher/final"),
    "tiny-dense",
    str(G / "data/tokenizer-v1024"),
    str(G / "data/tokenizer-v1024"),
    {s: str(G / f"data/{s}.jsonl") for s in qr.SPLITS},
    128,
    8,
    3e-3,
    20,
    OUT,
    64,
    8192,
    "/tmp/i23g/corpus.txt",
)
EPOCHS = float(os.environ.get("EPOCHS", 100))
ALPHA = float(os.environ.get("ALPHA", 0.9))
T = float(os.environ.get("T", 1))
SEEDS = [int(s) for s in os.environ.get("SEEDS", "0,1,2").split(",")]


def cache(mode, size, dtype, temp, extra):
    name = f"{mode}_{size}_{dtype}_T{temp:g}" + "".join(f"_{k}{v}" for k, v in extra.items())
    root = OUT / "caches" / name
    raw = qr.recipe(setup, OUT / "caches/unused", train_blocks=16, seed=0)
    raw["distillation"]["loss"].update(alpha=1.0, temperature=temp)
    key = "top_k" if mode != "sampled" else "num_samples"
    raw["distillation"]["cache"] = {
        "mode": mode,
        key: size,
        "temperature": temp,
        "values_dtype": dtype,
        **extra,
    }
    cfg, _ = load_config(raw)
    write_cache(cfg, str(root), overwrite=False)
    m = json.loads((root / "manifest.json").read_text())
    return str(root), m["totals"]["bytes"] / m["layout"]["positions"]


TAIL = os.environ.get("TAIL")
if TAIL:  # experiment only: the topk_tail teacher as a dense distribution, its tail spread by a tail model
    import torch

    from sakd.losses import sparse as sp

    def _dense_tail(student_logits, teacher, temperature):
        s = sp.tempered_logprobs(student_logits, temperature)
        V, k = s.shape[-1], teacher.indices.shape[-1]
        tail = teacher.tail_logprob.to(s.dtype).unsqueeze(-1)
        t = (tail - torch.log(torch.tensor(float(V - k)))).expand_as(s).clone()
        t.scatter_(-1, teacher.indices, teacher.logprobs.to(s.dtype))
        return s, t

    sp._tail_logprobs = _dense_tail
    from sakd.losses import chunk_loop, logit_grads, sparse_grads

    _orig = sparse_grads.kd_block_for

    def _kd_block_for(spec, teacher, *, bridge, targets, chain, scratch):
        if isinstance(teacher, sp.SparseTeacher) and spec.sparse == "topk_tail" and bridge is None:
            assert spec.temperature == 1.0 == teacher.temperature
            V, k = scratch.shape[-1], teacher.indices.shape[-1]
            t = (
                (teacher.tail_logprob.float() - float(torch.log(torch.tensor(float(V - k)))))
                .unsqueeze(-1)
                .expand(-1, V)
                .clone()
            )
            t.scatter_(-1, teacher.indices, teacher.logprobs.float())
            return logit_grads.dense_kd_block(t, spec, scratch)
        return _orig(spec, teacher, bridge=bridge, targets=targets, chain=chain, scratch=scratch)

    chunk_loop.kd_block_for = _kd_block_for
    _recipe = qr.recipe

    def _unfused(*a, **kw):
        raw = _recipe(*a, **kw)
        raw["distillation"]["loss"]["fused"] = False
        return raw

    qr.recipe = _unfused
scorer = qr.Scorer(setup)
log = OUT / "arms.jsonl"
for arm in sys.argv[1:]:
    parts = arm.split(":")
    root, bpt, sparse = None, None, None
    if parts[0] != "live":
        mode, size = parts[0], int(parts[1][1:])
        dtype = parts[2] if len(parts) > 2 else "float16"
        ctemp = float(parts[3]) if len(parts) > 3 else T
        extra = dict(p.split("=") for p in parts[4:])
        extra = {k: (int(v) if v.isdigit() else v) for k, v in extra.items()}
        root, bpt = cache(mode, size, dtype, ctemp, extra)
    for seed in SEEDS:
        run = qr.Run(
            arm.replace(":", "_") + (f"_tail{TAIL}" if TAIL else ""), 2048, EPOCHS, ALPHA, T, seed, cache=root
        )
        t0 = time.perf_counter()
        row = qr.train_and_score(setup, run, scorer) if not os.environ.get("KEEP") else None
        if row is None:  # keep the student
            run_dir = OUT / "keep" / run.name
            raw = qr.recipe(setup, run_dir, train_blocks=16, seed=seed, epochs=EPOCHS)
            raw["distillation"]["loss"].update(alpha=ALPHA, temperature=T)
            if root:
                raw["distillation"]["teacher_cache"] = root
            s = qr._train(raw)
            sc = scorer.score(s["final_dir"], setup.tokenizer)
            row = {
                "arm": run.arm,
                "seed": seed,
                "test_bpb": sc["test"]["bpb"],
                "validation_bpb": sc["validation"]["bpb"],
                "final_dir": s["final_dir"],
            }
        row.update(
            arm_spec=arm + (f" tail={TAIL}" if TAIL else ""),
            bytes_per_token=bpt,
            wall=round(time.perf_counter() - t0, 1),
        )
        print(
            json.dumps(
                {
                    k: row.get(k)
                    for k in ("arm_spec", "seed", "test_bpb", "validation_bpb", "bytes_per_token", "wall")
                }
            ),
            flush=True,
        )
        with log.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
