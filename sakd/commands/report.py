"""`sakd report RUN_DIR`: the metric curves of a run (metrics.jsonl) drawn to one PNG.

Besides the loss and throughput curves, the student-aware parts get panels of their own when the run
logged them: the token router's weights (mean/min/max, entropy, sharpness) and the mean weight of the tokens
each teacher expert routes (a heatmap of layer x expert at the last logged step), the Student-Aware Router's
drift from the original router (mean and per layer) and gate entropy, and the curriculum's multipliers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from sakd.errors import ReportError

# Panels in this order, each drawn when the run logged any of its curves: (title, curves); a curve is a
# scalar key, "prefix*" (every key with that prefix) or "key[]" (a list-valued key, one curve per entry).
PANELS: list[tuple[str, list[str]]] = [
    ("training loss", ["loss"]),
    ("KD term", ["kd"]),
    ("CE term", ["ce"]),
    ("held-out loss", ["eval_loss"]),
    ("top-1 agreement with teacher", ["eval_agreement"]),
    ("learning rate", ["lr"]),
    ("temperature", ["temperature"]),
    ("curriculum multipliers", ["mult_*"]),
    ("token-router weights", ["router_w_min", "router_w_mean", "router_w_max"]),
    ("token-router weight entropy / sharpness", ["router_w_entropy", "router_sharpness"]),
    ("SAR drift KL(original || learned gates)", ["sar_drift", "sar_drift_layers[]"]),
    ("SAR gate entropy / log E", ["sar_gate_entropy"]),
    ("SAR router loss KL(teacher || student)", ["sar_kd"]),
    ("gradient norm (pre-clip)", ["grad_norm"]),
    ("tokens / s", ["tokens_per_s"]),
    ("resident memory (MiB)", ["rss_mib"]),
    ("GPU peak allocated (MiB)", ["gpu_peak_mib"]),
]


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ReportError(f"{run_dir} has no metrics.jsonl (is it a sakd run directory?)")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise ReportError(f"{path}:{n} is not valid JSON") from None
    if not records:
        raise ReportError(f"{path} is empty: the run has not logged a step yet")
    return records


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _curves(records: list[dict], spec: str) -> dict[str, list[tuple[int, float]]]:
    """The (step, value) points of one curve spec (see :data:`PANELS`), by label."""
    out: dict[str, list[tuple[int, float]]] = {}
    if spec.endswith("*"):
        keys = sorted({k for r in records for k in r if k.startswith(spec[:-1])})
        for k in keys:
            out.update(_curves(records, k))
    elif spec.endswith("[]"):
        key = spec[:-2]
        for r in records:
            for i, v in enumerate(r.get(key) or []):
                if _finite(v):
                    out.setdefault(f"{key.removeprefix('sar_drift_')} {i}", []).append((r["step"], v))
    else:
        pts = [(r["step"], r[spec]) for r in records if _finite(r.get(spec))]
        if pts:
            out[spec] = pts
    return out


def panels(records: list[dict]) -> list[tuple[str, dict[str, list[tuple[int, float]]]]]:
    """The panels this run has data for, with their curves."""
    found = []
    for title, specs in PANELS:
        curves: dict[str, list[tuple[int, float]]] = {}
        for spec in specs:
            curves.update(_curves(records, spec))
        if curves:
            found.append((title, curves))
    return found


def draw(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Draw every available curve of ``run_dir`` into ``output`` (default RUN_DIR/report.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    found = panels(records)
    share = next((r["router_w_share"] for r in reversed(records) if r.get("router_w_share")), None)
    if not found:
        raise ReportError(f"{run_dir}/metrics.jsonl has no metric to draw")
    cols = 3
    rows = math.ceil((len(found) + (share is not None)) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax, (title, curves) in zip(flat, found, strict=False):
        for label, pts in curves.items():
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, ms=3, label=label)
        if len(curves) > 1:
            ax.legend(fontsize=6)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.grid(alpha=0.3)
    if share is not None:
        ax = flat[len(found)]
        image = ax.imshow(share, aspect="auto", cmap="coolwarm", vmin=0.5, vmax=1.5)
        ax.set_title("token weight by teacher expert (last step)", fontsize=10)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_ylabel("MoE layer", fontsize=8)
        fig.colorbar(image, ax=ax)
    for ax in flat[len(found) + (share is not None) :]:
        ax.axis("off")
    fig.suptitle(f"sakd run: {run_dir}", fontsize=11)
    fig.tight_layout()
    out = Path(output) if output else run_dir / "report.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
