"""`sakd report RUN_DIR`: the metric curves of a run (metrics.jsonl) drawn to one PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path

from sakd.errors import ReportError

# Curves worth a panel each, in this order, when the run logged them.
PANELS = [
    ("loss", "training loss"),
    ("kd", "KD term"),
    ("ce", "CE term"),
    ("eval_loss", "held-out loss"),
    ("eval_agreement", "top-1 agreement with teacher"),
    ("lr", "learning rate"),
    ("temperature", "temperature"),
    ("grad_norm", "gradient norm (pre-clip)"),
    ("tokens_per_s", "tokens / s"),
    ("rss_mib", "resident memory (MiB)"),
    ("gpu_peak_mib", "GPU peak allocated (MiB)"),
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


def draw(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Draw every available curve of ``run_dir`` into ``output`` (default RUN_DIR/report.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    series = {}
    for key, title in PANELS:
        pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        pts = [(x, y) for x, y in pts if math.isfinite(y)]
        if pts:
            series[key] = (title, pts)
    if not series:
        raise ReportError(f"{run_dir}/metrics.jsonl has no metric to draw")
    cols = 3
    rows = math.ceil(len(series) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, (title, pts) in zip(axes.flat, series.values(), strict=False):  # extra axes stay empty
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, ms=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(series) :]:
        ax.axis("off")
    fig.suptitle(f"sakd run: {run_dir}", fontsize=11)
    fig.tight_layout()
    out = Path(output) if output else run_dir / "report.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
