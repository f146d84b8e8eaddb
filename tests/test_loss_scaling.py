"""fp16 loss scaling (the P100 path: ``training.mixed_precision=fp16`` without DeepSpeed) with a real
``torch.amp.GradScaler``: an overflowing step is the scaler's to skip -- it lowers its scale and training
goes on -- not a non-finite step that stops the run.

This CPU has no fp16 autocast in Accelerate, so the test hands the run's Accelerator a CPU GradScaler the
way Accelerate wires a CUDA one (``accelerator.scaler``, ``native_amp``, and the prepared optimizer
rebuilt by ``AcceleratedOptimizer``'s own constructor with the scaler): scaling, unscaling, the overflow check and the skipped step are then torch's and Accelerate's
own code. A scale of 2**127 makes the scaled loss overflow fp32 for the first steps.
"""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

from sakd.config import load_config
from sakd.training.loop import NonFiniteError
from sakd.training.trainer import Distiller


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one state per process: an earlier test's is not fp16, this test's is, the next's not."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _scaled_run(tiny_run_config: dict, tmp_path, init_scale: float, max_steps: int):
    raw = copy.deepcopy(tiny_run_config)
    raw["training"].update(
        output_dir=str(tmp_path / "run"), max_steps=max_steps, save_every=0, mixed_precision="fp16"
    )
    cfg, _ = load_config(raw)
    d = Distiller(cfg, resume="none", overwrite=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=1000)
    d.accelerator.scaler, d.accelerator.native_amp = scaler, True
    d.optimizer.__init__(d.optimizer.optimizer, device_placement=False, scaler=scaler)  # Accelerate's wiring
    return d, scaler


def test_an_overflowing_fp16_step_lowers_the_scale_and_training_goes_on(
    tiny_run_config, tmp_path, fresh_accelerate_state
):
    d, scaler = _scaled_run(tiny_run_config, tmp_path, 2.0**127, 8)
    before = {k: v.detach().clone() for k, v in d.hf_student.named_parameters()}
    d.train()
    s = d.state
    assert s.skipped_steps == 0  # no step was treated as non-finite
    assert 1 <= s.scaler_skipped_steps < 8  # overflows at first, then real steps
    assert scaler.get_scale() == 2.0**127 / 2**s.scaler_skipped_steps  # halved once per overflow
    assert d.scheduler.scheduler.last_epoch == 8 - s.scaler_skipped_steps  # overflow steps leave the LR alone
    after = dict(d.hf_student.named_parameters())
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(before[k], p) for k, p in after.items())


def test_a_non_finite_gradient_under_fp16_still_stops_the_run(
    tiny_run_config, tmp_path, fresh_accelerate_state
):
    """A NaN gradient from a finite loss (a bug, not an overflow): the scaler skips and halves 4 -> 2 -> 1 ->
    0.5; below a scale of 1 each such step is a non-finite skip, and the 5th in a row stops the run
    (training.max_consecutive_skips) with the weights untouched -- not halving to 0 and on to NaN weights."""
    d, scaler = _scaled_run(tiny_run_config, tmp_path, 4.0, 20)
    before = {k: v.detach().clone() for k, v in d.hf_student.named_parameters()}
    next(p for p in d.hf_student.parameters() if p.requires_grad).register_hook(lambda g: g * float("nan"))
    with pytest.raises(NonFiniteError):
        d.train()
    assert (d.state.scaler_skipped_steps, d.state.skipped_steps, d.state.step) == (3, 5, 8)
    assert scaler.get_scale() < 1.0
    for k, p in d.hf_student.named_parameters():
        assert torch.equal(before[k], p.detach()), k
