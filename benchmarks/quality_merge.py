"""One table from every run a `sakd bench quality` output directory holds (OUT/runs.jsonl), when the grid was
run in several invocations (e.g. fewer seeds for the slow live arm: benchmarks/real_teacher_quality.sh).
usage: python benchmarks/quality_merge.py OUT   -> prints the table of sakd bench quality, the cache sizes, and
per arm the seed-by-seed test bpb and summed train / run wall seconds."""

import json
import sys
from pathlib import Path

from sakd.commands import quality_summary as qs

out = Path(sys.argv[1])
rows = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines() if line.strip()]
report = json.loads((out / "quality.json").read_text())  # the last invocation's: teacher scores
caches = []
for manifest in sorted(out.glob("caches/*/manifest.json")):
    m = json.loads(manifest.read_text())
    name = manifest.parent.name.rsplit("_blocks", 1)[0]
    caches.append(
        {
            "name": name,
            "bytes_per_token": m["totals"]["bytes"] / m["layout"]["positions"],
            "positions": m["layout"]["positions"],
        }
    )
bpt = {c["name"]: c["bytes_per_token"] for c in caches}
results = qs.summarize(rows, report["teacher"]["test"]["bpb"], bpt)
print(qs.to_markdown(results, report["teacher"]))
print()
for c in caches:
    print(f"cache {c['name']}: {c['bytes_per_token']:.1f} B/token over {c['positions']} positions")
for r in results:
    print(
        r["arm"],
        "seeds",
        r["seeds"],
        "test",
        [round(x, 4) for x in r["test_bpb"]],
        "gap",
        None if not r["gap_closed"] else [round(100 * g, 1) for g in r["gap_closed"]],
    )
wall = qs.wall_times(rows, [])
for arm in wall["train_seconds_per_arm"]:
    n = sum(r["arm"] == arm for r in rows)
    print(
        f"{arm}: {n} runs, train {wall['train_seconds_per_arm'][arm]:.0f} s, "
        f"run wall {wall['run_wall_seconds_per_arm'][arm]:.0f} s"
    )
print("cache writing s:", {c["arm"]: c["seconds"] for c in report["caches"]})
