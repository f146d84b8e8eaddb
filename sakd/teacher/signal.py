"""The teacher signal the objective consumes, behind one interface: ``signal(batch) -> HiddenAndHead``.

:class:`OnlineTeacher` runs the frozen teacher (replicated, quantized, or a ZeRO-3 engine) on each batch
-- on its own tokens when the tokenizers differ -- and returns its final hidden states, output head,
router probabilities (MoE) and whatever internals the auxiliary terms asked for. An offline cache is
another implementation of the same call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from sakd.models.forward import HiddenAndHead, hidden_and_head


class OnlineTeacher:
    """A frozen teacher model run on every batch, without gradients."""

    def __init__(
        self,
        model: Any,
        *,
        aligned: bool,
        hidden_layers: Sequence[int] = (),
        attention_layers: Sequence[int] = (),
    ) -> None:
        self.model = model
        self.aligned = aligned  # batches carry the teacher's own tokens (teacher_input_ids)
        self.hidden_layers = list(hidden_layers)
        self.attention_layers = sorted(set(attention_layers))

    def __call__(self, batch: dict[str, torch.Tensor]) -> HiddenAndHead:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if self.aligned:
            ids, mask = batch["teacher_input_ids"], batch["teacher_attention_mask"]
        with torch.no_grad():
            return hidden_and_head(
                self.model,
                self.model,
                ids,
                mask,
                router=True,
                hidden_layers=self.hidden_layers,
                attention_layers=self.attention_layers,
            )
