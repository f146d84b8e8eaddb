"""How the objective changes over training: the temperature schedule, the progressive loss phases, the
token router's sharpening, and magnitude-aware balancing -- one :class:`Curriculum` that says, for each
optimizer step, the temperature and a multiplier per loss component.

Everything except the balancer is a pure function of (step, total steps), so a resumed run continues
exactly; the balancer's running magnitudes are state, saved in every checkpoint and updated from the
step's global per-token means (all ranks hold the same values: the same answer however a step is split).

**The balancing rule.** For the components ``c`` with a configured weight ``w_c > 0`` (kd: ``alpha``, ce:
``1 - alpha``, feature/attention/contrastive: their weights) let ``a_c`` be the running mean of the
component's per-token magnitude (decay ``balance_decay``, updated after every step). Component ``c`` is
multiplied by ``s_c = m / a_c`` with ``m = sum_c w_c a_c / sum_c w_c``. Then every component contributes
``w_c * m`` -- in proportion to its weight, whatever its natural scale -- and the total keeps its magnitude
(``sum_c w_c s_c a_c = sum_c w_c a_c``): a weight of 0.1 means "a tenth of the share of a weight of 1".
Scales are clamped to [1e-2, 1e2] and are 1 until a component has been seen once (or while its running
magnitude is not above 0: a signed ``sampled`` KD estimate near 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from sakd.config import CurriculumConfig, LossConfig, TokenRouterConfig
from sakd.objective.terms import phases

_SCALE_RANGE = (1e-2, 1e2)


def progress(step: int, total_steps: int) -> float:
    """Share of training done before optimizer ``step``: 0 at the first step, 1 at the last."""
    return 1.0 if total_steps <= 1 else min(max(step / (total_steps - 1), 0.0), 1.0)


def temperature_at(cfg: LossConfig, step: int, total_steps: int) -> float:
    """Temperature at optimizer ``step`` of ``total_steps``: from ``temperature`` to ``min_temperature``.

    The seed's curriculum annealed 3.0 -> 2.0 (``use_temperature_curriculum``); ``linear`` reproduces it.
    """
    if cfg.temperature_schedule == "constant" or cfg.min_temperature is None or total_steps <= 1:
        return cfg.temperature
    frac = progress(step, total_steps)
    if cfg.temperature_schedule == "cosine":
        frac = 0.5 * (1 - math.cos(math.pi * frac))
    return cfg.temperature + (cfg.min_temperature - cfg.temperature) * frac


def ramp(frac: float, start: float, length: float) -> float:
    """0 before ``start``, then linear to 1 over ``length`` (a step at ``start`` when ``length`` is 0)."""
    if frac < start:
        return 0.0
    return 1.0 if length <= 0 else min((frac - start) / length, 1.0)


def phase_multipliers(cfg: CurriculumConfig, step: int, total_steps: int) -> dict[str, float]:
    """The seed's three phases, each term in the phase it declares (:mod:`sakd.objective.terms`): KD (and CE)
    from the start, feature/attention from ``structure_start``, the contrastive term from ``all_start``, each
    ramping in over ``ramp`` of training."""
    frac = progress(step, total_steps)
    start = {"start": None, "structure": cfg.structure_start, "late": cfg.all_start}
    return {
        c: 1.0 if start[phase] is None else ramp(frac, start[phase], cfg.ramp)
        for c, phase in phases().items()
    }


def sharpness_at(cfg: TokenRouterConfig, step: int, total_steps: int) -> float:
    """How far the token router's weights are from uniform: 0 until ``sharpen_start``, 1 from ``sharpen_end``."""
    return ramp(progress(step, total_steps), cfg.sharpen_start, cfg.sharpen_end - cfg.sharpen_start)


@dataclass
class Balancer:
    """Running per-token magnitudes of the components and the scales they give (module docstring)."""

    decay: float
    magnitudes: dict[str, float] = field(default_factory=dict)

    def scales(self, weights: dict[str, float]) -> dict[str, float]:
        """``s_c = m / a_c`` for the weighted components already seen; 1 for the others.

        A running magnitude at or below 0 (a signed estimate near 0) counts 0 in ``m`` and scales by the upper
        clamp: the limit of ``m / a_c`` as ``a_c`` falls to 0, so the scale does not jump as it crosses 0."""
        seen = {c: w for c, w in weights.items() if w > 0 and c in self.magnitudes}
        if not any(self.magnitudes[c] > 0 for c in seen):
            return dict.fromkeys(weights, 1.0)
        mean = sum(w * max(self.magnitudes[c], 0.0) for c, w in seen.items()) / sum(seen.values())
        lo, hi = _SCALE_RANGE
        return {
            c: (min(max(mean / self.magnitudes[c], lo), hi) if self.magnitudes[c] > 0 else hi)
            if c in seen
            else 1.0
            for c in weights
        }

    def update(self, means: dict[str, float]) -> None:
        """Fold one step's per-token means (global over ranks) into the running magnitudes.

        A mean of exactly 0 is a component absent from the step and is skipped. A negative mean is folded
        in: ``sampled`` KD's step mean is an unbiased but signed estimate of a KL that can sit near 0, and
        keeping only its positive draws biased the running magnitude upwards (to ``E[x | x > 0]``); a
        running magnitude near or below 0 is floored in :meth:`scales`."""
        for c, x in means.items():
            if not math.isfinite(x) or x == 0:
                continue
            old = self.magnitudes.get(c)
            self.magnitudes[c] = x if old is None else self.decay * old + (1 - self.decay) * x


@dataclass(frozen=True)
class StepSchedule:
    """What one optimizer step uses: the temperature, a multiplier per component (phases x balancing;
    empty when both are off, which leaves the objective exactly as configured) and the router sharpness."""

    temperature: float
    multipliers: dict[str, float]
    sharpness: float


class Curriculum:
    """The schedule of a run (temperature, phases, balancing, router sharpening)."""

    def __init__(
        self, loss: LossConfig, cfg: CurriculumConfig, router: TokenRouterConfig, weights: dict[str, float]
    ):
        self.loss, self.cfg, self.router = loss, cfg, router
        self.weights = {c: w for c, w in weights.items() if w > 0}  # the configured weight of each component
        self.balancer = Balancer(cfg.balance_decay) if cfg.balance else None

    @property
    def active(self) -> bool:
        """Whether any multiplier can differ from 1 (otherwise the objective runs untouched)."""
        return self.cfg.phases or self.balancer is not None

    def at(self, step: int, total_steps: int) -> StepSchedule:
        multipliers: dict[str, float] = {}
        if self.active:
            multipliers = dict.fromkeys(self.weights, 1.0)
            if self.cfg.phases:
                phases = phase_multipliers(self.cfg, step, total_steps)
                multipliers = {c: m * phases.get(c, 1.0) for c, m in multipliers.items()}
            if self.balancer is not None:
                live = {c: self.weights[c] for c, m in multipliers.items() if m > 0}
                scales = self.balancer.scales(live)
                multipliers = {c: m * scales.get(c, 1.0) for c, m in multipliers.items()}
        return StepSchedule(
            temperature=temperature_at(self.loss, step, total_steps),
            multipliers=multipliers,
            sharpness=sharpness_at(self.router, step, total_steps) if self.router.enabled else 0.0,
        )

    def update(self, step_means: dict[str, float]) -> None:
        """After a taken step: the balancer learns the components' magnitudes (raw, before any weight)."""
        if self.balancer is not None:
            self.balancer.update({c: v for c, v in step_means.items() if c in self.weights})

    def state_dict(self) -> dict[str, float]:
        return {} if self.balancer is None else dict(self.balancer.magnitudes)

    def load_state_dict(self, state: dict[str, float]) -> None:
        if self.balancer is not None:
            self.balancer.magnitudes = {str(k): float(v) for k, v in state.items()}
