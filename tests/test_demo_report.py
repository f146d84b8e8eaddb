"""The demo's figures from fabricated scores: the CE reference chosen on validation, the paired shares of the
gap closed, the share against the CE mean, and the verdict on mean bits per byte (hand-computed values)."""

from __future__ import annotations

from typing import Any

import pytest

from sakd.commands.demo_report import demo_line, gap_shares, quality

TEACHER = 0.5
KD = [1.4, 1.5, 1.3]
CE = [2.1, 2.0, 2.3]  # held-out: seed 1 is the best here ...
CE_VALIDATION = [1.9, 2.05, 2.0]  # ... but seed 0 is the best on validation: the reference
# against seed 0's held-out 2.1: (2.1 - kd) / (2.1 - 0.5)
AGAINST_REFERENCE = [0.7 / 1.6, 0.6 / 1.6, 0.8 / 1.6]
PAIRED = [0.7 / 1.6, 0.5 / 1.5, 1.0 / 1.8]  # (ce_i - kd_i) / (ce_i - 0.5)
AGAINST_MEAN = 2.2 / 4.9  # mean KD 1.4, mean CE 6.4 / 3: (6.4 - 4.2) / (6.4 - 1.5)


def _scores(bpb: float, ppl: float) -> dict[str, Any]:
    return {
        "bpb": bpb,
        "ppl": ppl,
        "loss": 1.0,
        "agreement": 0.5,
        "method": "strided",
        "window": 8,
        "stride": 4,
        "tokens": 100,
        "bytes": 300,
    }


def _results(kd: list[float], ce: list[float], kd_ppl: list[float], ce_ppl: list[float]) -> dict[str, Any]:
    results: dict[str, Any] = {"teacher": _scores(TEACHER, 2.0), "documents": {"eval": 3}}
    for s in range(len(kd)):
        results[f"kd_seed{s}"] = _scores(kd[s], kd_ppl[s])
        results[f"ce_seed{s}"] = _scores(ce[s], ce_ppl[s])
    return results


def test_gap_shares_hand_computed():
    shares = gap_shares(TEACHER, KD, CE, CE_VALIDATION)
    assert shares["reference"] == 0 and shares["reference_bpb"] == 2.1
    assert shares["against_reference"] == pytest.approx(AGAINST_REFERENCE, rel=1e-12)
    assert (shares["mean"], shares["min"], shares["max"]) == pytest.approx((0.7 / 1.6, 0.6 / 1.6, 0.8 / 1.6))
    assert shares["paired"] == pytest.approx(PAIRED, rel=1e-12)
    assert shares["against_mean"] == pytest.approx(AGAINST_MEAN, rel=1e-12)


def test_summary_and_printed_line_carry_the_shares():
    # mean perplexity says CE (100 < 340) while mean bits per byte says KD (1.4 < 2.13): the verdict is
    # defined on bits per byte
    summary = quality(_results(KD, CE, [10, 10, 1000], [100, 100, 100]), [0, 1, 2], CE_VALIDATION)
    assert summary["kd_beats_ce"] is True
    assert summary["ce_reference_seed"] == 0 and summary["ce_reference_student_bpb"] == 2.1
    assert summary["kd_gap_closed"] == pytest.approx(0.7 / 1.6, rel=1e-12)
    assert summary["kd_gap_closed_paired"] == pytest.approx(PAIRED, rel=1e-12)
    assert [s["kd_gap_closed_vs_same_seed_ce"] for s in summary["per_seed"]] == pytest.approx(
        PAIRED, rel=1e-12
    )
    assert summary["kd_gap_closed_vs_ce_mean"] == pytest.approx(AGAINST_MEAN, rel=1e-12)
    summary.update(scored_on="heldout", total_seconds=75.2, student_dir="runs/demo/kd_student/seed0/final")
    lines = demo_line(summary).splitlines()
    assert len(lines) == 2
    assert "teacher 0.500, KD students 1.400, CE students 2.133 (means of 3 seeds); 75 s" in lines[0]
    assert lines[1] == (
        "KD closed 43.8% (min 37.5%, max 50.0% over 3 KD seeds) of the gap to the teacher of CE seed 0 (2.100; "
        "chosen as the CE seed lowest on validation); each KD seed against its own CE twin: 43.8%, 33.3%, 55.6%; "
        "against the CE students' mean: 44.9%."
    )

    worse = quality(_results(CE, KD, [100, 100, 100], [10, 10, 1000]), [0, 1, 2], KD)  # the roles swapped
    assert worse["kd_beats_ce"] is False and "did NOT beat" in worse["verdict"]
