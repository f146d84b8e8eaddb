"""The frozen MoE teacher as a teacher signal with its routing decided from outside: Knowledge Augmentation
or the Student-Aware Router's all-experts routing (the routing itself: :mod:`sakd.teacher.moe`)."""

from __future__ import annotations

import torch
from torch import nn

from sakd.config import MoEConfig
from sakd.models.forward import HiddenAndHead
from sakd.teacher.capabilities import live_capabilities
from sakd.teacher.moe import RoutingSpec, augmented_forward, block_generators, override_routing, require_moe
from sakd.teacher.moe_router import StudentAwareRouter
from sakd.teacher.signal import OnlineTeacher


class RoutedTeacher(OnlineTeacher):
    """The frozen MoE teacher as a teacher signal -- :class:`~sakd.teacher.signal.OnlineTeacher`'s forward --
    with its routing decided from outside: Knowledge Augmentation (``augment``: ``distillation.moe`` with
    ``augment_samples > 0``; ``keep_samples`` keeps the M final hidden states for a forward-KL mixture) or all
    experts through the Student-Aware Router's learned logits (``sar``, a
    :class:`sakd.teacher.moe_router.StudentAwareRouter`). ``step`` (set by the
    trainer before each step) seeds KA's draws together with ``seed`` and each block's sample id."""

    def __init__(
        self,
        model: nn.Module,
        *,
        aligned: bool,
        hidden_layers: list[int],
        attention_layers: list[int],
        seed: int,
        augment: MoEConfig | None = None,
        keep_samples: bool = False,
        sar: StudentAwareRouter | None = None,
    ) -> None:
        require_moe(model, "distillation.moe")
        super().__init__(
            model, aligned=aligned, hidden_layers=hidden_layers, attention_layers=attention_layers
        )
        self.seed, self.step = seed, 0
        self.augment, self.keep_samples, self.sar = augment, keep_samples, sar
        self.decisions = 0
        self.changed: torch.Tensor | int = 0  # on the teacher's device once counted
        self.capabilities = live_capabilities(moe=True, routing="sar" if sar is not None else "ka")

    def at_step(self, step: int) -> None:
        """The optimizer step about to run: KA's draws are seeded with it."""
        self.step = step

    def pop_stats(self) -> tuple[torch.Tensor | int, int]:
        """KA since the last call: (routing decisions that chose other experts than the top k -- a tensor on
        the teacher's device, no host sync per forward --, decisions)."""
        out = (self.changed, self.decisions)
        self.decisions, self.changed = 0, 0
        return out

    def __call__(self, batch: dict[str, torch.Tensor]) -> HiddenAndHead:
        if self.sar is not None:  # every expert, through the router's learned logits
            with override_routing(self.model, self.sar.routing()):
                return super().__call__(batch)
        moe = self.augment
        if moe is None:
            raise ValueError("RoutedTeacher needs augment (Knowledge Augmentation) or sar")
        ids, mask = self.inputs(batch)
        samples = moe.augment_samples
        sample_ids = (
            batch["sample_ids"].reshape(-1).tolist() if "sample_ids" in batch else list(range(len(ids)))
        )
        spec = RoutingSpec(
            "ka",
            k=moe.augment_experts,
            sampling_prob=moe.augment_sampling_prob,
            generators=block_generators(self.seed, self.step, sample_ids, samples, ids.device),
        )
        out = augmented_forward(
            self.model,
            ids,
            mask,
            spec,
            samples,
            keep_samples=self.keep_samples,
            hidden_layers=self.hidden_layers,
            attention_layers=self.attention_layers,
        )
        self.decisions += spec.decisions
        self.changed = self.changed + spec.changed
        return out
