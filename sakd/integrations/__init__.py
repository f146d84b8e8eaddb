"""For people who keep their own training script: sakd's objective inside a ``transformers.Trainer``
(:class:`DistillationTrainer`) and the data it reads (:func:`prepare_distillation_data`)."""

from sakd.integrations.data import DistillationCollator, DistillationData, prepare_distillation_data
from sakd.integrations.hf_trainer import DistillationTrainer

__all__ = ["DistillationCollator", "DistillationData", "DistillationTrainer", "prepare_distillation_data"]
