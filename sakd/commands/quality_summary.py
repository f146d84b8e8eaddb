"""What ``sakd bench quality`` reports from its runs: per grid cell (unique-token budget x epochs) and arm,
the setting (alpha, T) chosen on the validation split, its held-out (test) bits per byte over seeds, and
the share of the CE -> teacher gap it closes; a Markdown table and a PNG.

Selection reads only ``validation_bpb``; ``test_bpb`` is only reported. The gap is measured against the
CE-only seed of the same cell with the best validation bpb (chosen on validation like every setting, then
its test bpb):
``gap_closed = (bpb_CE - bpb_KD) / (bpb_CE - bpb_teacher)`` per KD seed, then mean and spread.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any


def spread(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (None for one value: no spread was measured), min, max and count."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "n": len(values),
        "min": min(values),
        "max": max(values),
    }


def gap_closed(ce: float, kd: float, teacher: float) -> float | None:
    """Share of the CE-only student's distance to the teacher that KD closed (None when there is none)."""
    return None if ce == teacher else (ce - kd) / (ce - teacher)


def select(rows: list[dict[str, Any]]) -> tuple[tuple[float, float], list[dict[str, Any]]]:
    """The (alpha, T) with the lowest mean validation bpb over seeds among one cell's runs of one arm (the
    first in run order on a tie), and every candidate's mean."""
    by_setting: dict[tuple[float, float], list[float]] = defaultdict(list)
    for r in rows:
        by_setting[(r["alpha"], r["temperature"])].append(r["validation_bpb"])
    candidates = [
        {"alpha": a, "temperature": t, "validation_bpb_mean": statistics.fmean(v), "seeds": len(v)}
        for (a, t), v in by_setting.items()
    ]
    best = min(candidates, key=lambda c: c["validation_bpb_mean"])
    return (best["alpha"], best["temperature"]), candidates


def summarize(
    runs: list[dict[str, Any]], teacher_test_bpb: float, cache_bpt: dict[str, float]
) -> list[dict[str, Any]]:
    """One result per (budget, epochs, arm), in run order."""
    cells: dict[tuple[int, float, str], list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        cells[(r["budget"], r["epochs"], r["arm"])].append(r)
    results = []
    for (budget, epochs, arm), rows in cells.items():
        (alpha, temp), candidates = select(rows)
        chosen = sorted(
            (r for r in rows if (r["alpha"], r["temperature"]) == (alpha, temp)), key=lambda r: r["seed"]
        )
        ce_rows = cells.get((budget, epochs, "ce"), [])
        ce_best = min(ce_rows, key=lambda r: r["validation_bpb"], default=None)  # chosen on validation
        ce_ref = None if ce_best is None else ce_best["test_bpb"]
        result: dict[str, Any] = {
            "budget": budget,
            "epochs": epochs,
            "arm": arm,
            "selected": {"alpha": alpha, "temperature": temp},
            "selected_by": "validation_bpb_mean",
            "candidates": candidates,
            "seeds": [r["seed"] for r in chosen],
            "validation_bpb": [r["validation_bpb"] for r in chosen],
            "test_bpb": [r["test_bpb"] for r in chosen],
            "test_bpb_stats": spread([r["test_bpb"] for r in chosen]),
            "ce_reference_test_bpb": ce_ref,
            "ce_reference_seed": None if ce_best is None else ce_best["seed"],
            "train_seconds": spread([r["train_seconds"] for r in chosen]),
            "seconds_per_step": statistics.fmean(r["seconds_per_step"] for r in chosen),
            "cache_bytes_per_token": cache_bpt.get(f"{arm}_T{temp:g}"),
        }
        gaps = None
        if arm != "ce" and ce_ref is not None:
            gaps = [gap_closed(ce_ref, r["test_bpb"], teacher_test_bpb) for r in chosen]
            gaps = None if None in gaps else gaps
        result["gap_closed"] = gaps
        result["gap_closed_stats"] = spread(gaps) if gaps else None
        results.append(result)
    return results


def wall_times(runs: list[dict[str, Any]], caches: list[dict[str, Any]]) -> dict[str, Any]:
    """Training seconds per arm (all its runs; and their wall time with setup and scoring), cache-writing
    seconds per cache."""
    per_arm: dict[str, float] = defaultdict(float)
    wall: dict[str, float] = defaultdict(float)
    for r in runs:
        per_arm[r["arm"]] += r["train_seconds"]
        wall[r["arm"]] += r.get("wall_seconds", 0.0)
    return {
        "train_seconds_per_arm": dict(per_arm),
        "run_wall_seconds_per_arm": dict(wall),
        "cache_seconds": {c["arm"] + f"_T{c['temperature']:g}": c["seconds"] for c in caches},
    }


def _fmt(stats: dict[str, Any] | None, pct: bool = False) -> str:
    if stats is None:
        return "—"
    k, digits = (100, 1) if pct else (1, 3)
    if stats["std"] is None:  # one seed: no spread to show
        return f"{k * stats['mean']:.{digits}f} (1 seed)"
    return f"{k * stats['mean']:.{digits}f} ± {k * stats['std']:.{digits}f}"


def to_markdown(results: list[dict[str, Any]], teacher: dict[str, Any]) -> str:
    """The results as a Markdown table (test bpb and gap closed: mean ± std over seeds, or the value and
    "(1 seed)")."""
    lines = [
        f"teacher: validation bpb {teacher['validation']['bpb']:.3f}, test bpb {teacher['test']['bpb']:.3f}",
        "",
        "| budget | epochs | arm | α | T | val bpb | test bpb | gap closed % | train s | B/token |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        sel, bpt = r["selected"], r["cache_bytes_per_token"]
        lines.append(
            f"| {r['budget']:,} | {r['epochs']:g} | {r['arm']} | {sel['alpha']:g} | {sel['temperature']:g} | "
            f"{spread(r['validation_bpb'])['mean']:.3f} | {_fmt(r['test_bpb_stats'])} | "
            f"{_fmt(r['gap_closed_stats'], pct=True)} | {r['train_seconds']['mean']:.1f} | "
            f"{'—' if bpt is None else f'{bpt:.1f}'} |"
        )
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], teacher_test_bpb: float, out: Path) -> Path:
    """Two panels against epochs, one line per arm and budget: held-out bpb (teacher dashed) and the share
    of the gap closed; error bars span the seeds (min to max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_bpb, ax_gap) = plt.subplots(1, 2, figsize=(12, 4.5))
    lines: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        lines[(r["arm"], r["budget"])].append(r)
    colors = {arm: f"C{i % 10}" for i, arm in enumerate(dict.fromkeys(r["arm"] for r in results))}
    styles = {budget: ("-", "--", ":", "-.")[i % 4] for i, budget in enumerate(sorted({b for _, b in lines}))}
    for (arm, budget), rows in lines.items():
        style = {"color": colors[arm], "ls": styles[budget], "marker": "o", "capsize": 3}
        rows.sort(key=lambda r: r["epochs"])
        x = [r["epochs"] for r in rows]
        label = f"{arm}, {budget:,} tokens"
        s = [r["test_bpb_stats"] for r in rows]
        err = [[v["mean"] - v["min"] for v in s], [v["max"] - v["mean"] for v in s]]
        ax_bpb.errorbar(x, [v["mean"] for v in s], yerr=err, label=label, **style)
        if all(r["gap_closed_stats"] for r in rows):
            g = [r["gap_closed_stats"] for r in rows]
            err = [[100 * (v["mean"] - v["min"]) for v in g], [100 * (v["max"] - v["mean"]) for v in g]]
            ax_gap.errorbar(x, [100 * v["mean"] for v in g], yerr=err, label=label, **style)
    ax_bpb.axhline(teacher_test_bpb, color="k", ls="--", lw=1, label="teacher")
    ax_bpb.set(xlabel="epochs", ylabel="held-out (test) bits per byte", title="bits per byte")
    ax_gap.axhline(0, color="k", lw=0.8)
    ax_gap.set(xlabel="epochs", ylabel="% of the CE -> teacher gap closed", title="gap closed")
    for ax in (ax_bpb, ax_gap):
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
