"""One table from every run a `sakd bench quality` output directory holds (OUT/runs.jsonl), when the grid was
run in several invocations (e.g. fewer seeds for the slow live arm: benchmarks/real_teacher_quality.sh).
usage: python benchmarks/quality_merge.py OUT   -> prints the table of sakd bench quality, the cache sizes, and
per arm the seed-by-seed test bpb and summed train / run wall seconds. Rows of different setups (setup_key)
are reported one table per setup; a run name seen twice within one setup keeps its first row."""

import json
import sys
from pathlib import Path

from sakd.commands import quality_summary as qs


def by_setup(rows: list[dict]) -> dict[str, list[dict]]:
    """The rows per setup_key, in file order, each run name once (the first row; the others announced)."""
    groups: dict[str, dict[str, dict]] = {}
    for r in rows:
        group = groups.setdefault(str(r.get("setup_key")), {})
        if r["name"] in group:
            print(f"duplicate run {r['name']} (setup {r.get('setup_key')}): keeping its first row")
            continue
        group[r["name"]] = r
    return {key: list(g.values()) for key, g in groups.items()}


def report_setup(rows: list[dict], report: dict, bpt: dict[str, float]) -> None:
    results = qs.summarize(rows, report["teacher"]["test"]["bpb"], bpt)
    print(qs.to_markdown(results, report["teacher"]))
    print()
    for r in results:
        gaps = None if not r["gap_closed"] else [round(100 * g, 1) for g in r["gap_closed"]]
        print(r["arm"], "seeds", r["seeds"], "test", [round(x, 4) for x in r["test_bpb"]], "gap", gaps)
    wall = qs.wall_times(rows, [])
    for arm in wall["train_seconds_per_arm"]:
        n = sum(r["arm"] == arm for r in rows)
        print(
            f"{arm}: {n} runs, train {wall['train_seconds_per_arm'][arm]:.0f} s, "
            f"run wall {wall['run_wall_seconds_per_arm'][arm]:.0f} s"
        )


def main(out: Path) -> None:
    rows = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines() if line.strip()]
    report = json.loads((out / "quality.json").read_text())  # the last invocation's: teacher scores
    caches = []
    for manifest in sorted(out.glob("caches/*/manifest.json")):
        m = json.loads(manifest.read_text())
        name = manifest.parent.name.rsplit("_blocks", 1)[0]
        positions = m["layout"]["positions"]
        caches.append(
            {"name": name, "bytes_per_token": m["totals"]["bytes"] / positions, "positions": positions}
        )
    bpt = {c["name"]: c["bytes_per_token"] for c in caches}
    groups = by_setup(rows)
    if len(groups) > 1:
        print(f"{out / 'runs.jsonl'} holds {len(groups)} setups (setup_key): one table each")
    own = report.get("setup_key")  # None: a quality.json older than the key (then one setup is assumed)
    for key, group in groups.items():
        print(f"\n## setup {key}: {len(group)} runs\n")
        if own is None and len(groups) > 1 or own is not None and key != own:
            # quality.json's teacher scores are another setup's: no gap closed from them
            print(
                "(not the setup of quality.json: its teacher score is unknown here; test bpb per seed only)"
            )
            for arm in sorted({r["arm"] for r in group}):
                print(arm, sorted((r["seed"], round(r["test_bpb"], 4)) for r in group if r["arm"] == arm))
            continue
        report_setup(group, report, bpt)
    print()
    for c in caches:
        print(f"cache {c['name']}: {c['bytes_per_token']:.1f} B/token over {c['positions']} positions")
    print("cache writing s:", {Path(c["dir"]).name: c["seconds"] for c in report["caches"]})


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
