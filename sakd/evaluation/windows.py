"""Which windows of a token stream are run through the model, and which tokens each one scores.

Two methods, as in the Hugging Face guide "Perplexity of fixed-length models":

- **blocked** (``stride`` None or equal to the window): consecutive, non-overlapping windows; the first
  token of each window has no context and is not scored. Cheap (one forward per window), but tokens
  near a window start are predicted from little context.
- **strided** (``stride`` < window): windows start every ``stride`` tokens; each scores only the tokens
  no earlier window scored, so every token after the stream's first is scored exactly once, with at
  least ``window - stride`` tokens of context (the first window: fewer). ``window / stride`` times the
  forwards.

Counting is exact: window ``k`` scores stream positions ``[max(prev_end, begin + 1), end)``. (The
guide's code weights each window's mean loss by its target count minus one, which under-counts every
window after the first by one token; here each scored token counts once.) With ``stride == window``
the strided plan *is* the blocked plan.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Window:
    """Stream positions ``[begin, end)`` go through the model; targets ``[first, end)`` are scored."""

    begin: int
    end: int
    first: int


def plan_windows(n_tokens: int, window: int, stride: int | None = None) -> list[Window]:
    """The windows that score a stream of ``n_tokens`` tokens (see the module docstring)."""
    stride = window if stride is None else stride
    if window < 2:
        raise ValueError(f"an evaluation window needs at least 2 tokens, got {window}")
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be between 1 and the window ({window}), got {stride}")
    out: list[Window] = []
    prev_end = 0
    for begin in range(0, max(n_tokens - 1, 0), stride):
        end = min(begin + window, n_tokens)
        out.append(Window(begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return out


def method_name(window: int, stride: int | None) -> str:
    """``blocked`` or ``strided``, as reported next to every held-out number."""
    return "blocked" if stride is None or stride == window else "strided"
