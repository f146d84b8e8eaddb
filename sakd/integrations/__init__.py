"""For people who keep their own training script: sakd's objective inside a ``transformers.Trainer``
(:class:`DistillationTrainer`), the data it reads (:func:`prepare_distillation_data`) and its stages
(:class:`TrainerStages`)."""

from sakd.integrations.data import DistillationCollator, DistillationData, prepare_distillation_data
from sakd.integrations.hf_trainer import DistillationTrainer
from sakd.integrations.trainer_stages import TrainerStages

__all__ = [
    "DistillationCollator",
    "DistillationData",
    "DistillationTrainer",
    "TrainerStages",
    "prepare_distillation_data",
]
