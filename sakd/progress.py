"""Progress of long work: a tqdm bar on a terminal; in a log file or CI, a plain line every few steps.

A redirected tqdm bar writes a carriage-return update per step -- thousands of them in a captured log.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm.auto import tqdm


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Counts ``total`` units from ``initial``; ``advance`` moves it on and updates the shown figures.

    On a terminal it is a tqdm bar; otherwise (``stream`` not a tty) a line ``desc: n/total (pct) k=v ...
    elapsed, eta`` is written each time the count passes a multiple of ``every`` (in the count's units: a
    resumed run keeps the same lines), and at the end, and nothing else.
    ``enabled=False`` shows nothing (other ranks, ``logging.progress_bar=false``).
    """

    def __init__(
        self,
        total: int,
        *,
        desc: str,
        enabled: bool = True,
        every: int = 1,
        initial: int = 0,
        unit: str = "it",
        stream: TextIO | None = None,
    ) -> None:
        self.total, self.n, self.desc, self.unit = total, initial, desc, unit
        self.every, self.start_n = max(1, every), initial
        self.stream = stream if stream is not None else sys.stderr
        self.plain = enabled and not self.stream.isatty()
        self.bar = None
        if enabled and not self.plain:
            bar_unit = {"unit": unit, "unit_scale": unit != "it"}
            self.bar = tqdm(
                total=total, initial=initial, desc=desc, dynamic_ncols=True, file=self.stream, **bar_unit
            )
        self.figures: dict[str, str] = {}
        self.t0 = time.perf_counter()

    def advance(self, n: int = 1, **figures: str) -> None:
        self.n += n
        self.figures.update(figures)
        if self.bar is not None:
            self.bar.update(n)
            if figures:
                self.bar.set_postfix(self.figures, refresh=False)
        elif self.plain and ((self.n - n) // self.every < self.n // self.every or self.n >= self.total):
            self._line()

    def _line(self) -> None:
        elapsed = time.perf_counter() - self.t0
        done = self.n - self.start_n
        eta = elapsed / done * (self.total - self.n) if done > 0 else 0.0
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        figs = "".join(f" {k} {v}" for k, v in self.figures.items())
        unit = "" if self.unit == "it" else f" {self.unit}"
        print(
            f"{self.desc}: {self.n}/{self.total}{unit}{pct}{figs}, {_duration(elapsed)} elapsed, eta {_duration(eta)}",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
