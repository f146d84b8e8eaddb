"""`sakd report` draws the logged curves; memory is logged with every training record."""

import copy
import json

import pytest
from PIL import Image

from sakd.cli import main
from sakd.config import load_config
from sakd.training.trainer import Distiller


@pytest.mark.integration
def test_report_draws_a_run(tiny_run_config, tmp_path, capsys):
    raw = copy.deepcopy(tiny_run_config)
    raw["training"].update(max_steps=4, eval_every=2)
    cfg, _ = load_config(raw)
    Distiller(cfg, resume="none", overwrite=True).train()
    run = tmp_path / "run"
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["rss_mib"] > 10 for r in records if "loss" in r)
    assert main(["report", str(run)]) == 0
    png = run / "report.png"
    width, height = Image.open(png).size
    assert width > 800 and height > 500  # several panels were drawn


def test_report_of_a_non_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sakd: error:") and "no metrics.jsonl" in err and len(err.splitlines()) == 1


@pytest.mark.integration
def test_tensorboard_tracker_gets_the_logged_metrics(tiny_run_config, tmp_path):
    """logging.report_to=tensorboard goes through Accelerate's tracker: the event file under the run
    directory holds the same per-step loss as metrics.jsonl."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    raw = copy.deepcopy(tiny_run_config)
    raw["training"].update(max_steps=3)
    raw["logging"].update(report_to="tensorboard", project="tb")
    cfg, _ = load_config(raw)
    Distiller(cfg, resume="none", overwrite=True).train()
    run = tmp_path / "run"
    events = sorted(run.glob("tb/events.out.tfevents.*"))  # scalars; the hparams table is in a sub-directory
    assert events, "no tensorboard event file"
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    board = {e.step: e.value for e in acc.Scalars("loss")}
    assert sorted(board) == [r["step"] for r in logged]
    assert all(board[r["step"]] == pytest.approx(r["loss"], rel=1e-6) for r in logged)
    assert "eval_loss" in acc.Tags()["scalars"]


def test_report_draws_the_student_aware_panels(tmp_path):
    """The router weights, the expert heatmap, the SAR drift per layer and the curriculum multipliers get
    panels of their own (from a metrics.jsonl written here, as a run writes it)."""
    from sakd.commands.report import draw, panels, read_metrics

    lines = []
    for step in range(1, 6):
        lines.append(
            {
                "step": step,
                "loss": 3.0 - step * 0.1,
                "router_w_mean": 1.0,
                "router_w_min": 0.3,
                "router_w_max": 2.0 + step * 0.1,
                "router_w_entropy": 0.95,
                "router_sharpness": step / 5,
                "router_w_share": [[1.1, 0.9], [1.0, 1.0]],
                "sar_drift": 0.01 * step,
                "sar_drift_layers": [0.005 * step, 0.015 * step],
                "sar_gate_entropy": 0.9,
                "mult_kd": 1.0,
                "mult_feature": step / 5,
            }
        )
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    found = dict(panels(read_metrics(tmp_path)))
    assert set(found["token-router weights"]) == {"router_w_min", "router_w_mean", "router_w_max"}
    assert set(found["SAR drift KL(original || learned gates)"]) == {"sar_drift", "layers 0", "layers 1"}
    assert set(found["curriculum multipliers"]) == {"mult_feature", "mult_kd"}
    assert found["curriculum multipliers"]["mult_feature"][-1] == (5, 1.0)
    png = draw(tmp_path)
    assert Image.open(png).size[1] > 500
