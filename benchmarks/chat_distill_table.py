"""The table of BENCHMARKS.md "Distilling SmolLM2-135M-Instruct on real conversations" from the evals/*.json
that benchmarks/chat_distill.sh writes: python benchmarks/chat_distill_table.py DIR/evals"""

import json
import pathlib
import statistics as st
import sys

E = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "evals")


def load(n):
    p = E / f"{n}.json"
    try:
        return json.loads(p.read_text())
    except Exception:
        return None


t = load("teacher")
print(f"teacher bpb {t['bpb']:.4f} loss {t['loss']:.4f} tokens {t['tokens']} bytes {t['bytes']}")
arms = {
    "CE (alpha 0)": ["ce-s0", "ce-s1", "ce-s2"],
    "KD from the cache (topk_tail k64)": ["kdc-s0", "kdc-s1", "kdc-s2"],
    "on-policy from scratch": ["on-s0"],
    "KD from the cache, then 50 on-policy steps": ["kdc-on-s0"],
}
ce_best = min(load(r)["bpb"] for r in arms["CE (alpha 0)"] if load(r))
ce_mean = st.mean(load(r)["bpb"] for r in arms["CE (alpha 0)"] if load(r))


def ms(xs):
    return f"{st.mean(xs):.3f}" + (f" ± {st.stdev(xs):.3f}" if len(xs) > 1 else "")


for arm, runs in arms.items():
    rs = [load(r) for r in runs if load(r)]
    if not rs:
        print(arm, "missing")
        continue
    bpb = [r["bpb"] for r in rs]
    gap = [(ce_best - b) / (ce_best - t["bpb"]) * 100 for b in bpb]
    g = [r["cont_greedy_teacher_nll"] for r in rs]
    gb = [r["cont_greedy_teacher_bpb"] for r in rs]
    s = [r["cont_sampled_teacher_nll"] for r in rs]
    sb = [r["cont_sampled_teacher_bpb"] for r in rs]
    gl = [r["cont_greedy_tokens"] for r in rs]
    print(
        f"| {arm} | {len(rs)} | {ms(bpb)} | {ms(gap)} | {ms(g)} / {ms(gb)} | {ms(s)} / {ms(sb)} | {ms(gl)} |"
    )
print(f"CE best {ce_best:.4f} mean {ce_mean:.4f}")
