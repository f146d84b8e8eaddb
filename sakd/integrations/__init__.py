"""For people who keep their own training script: sakd's objective inside a ``transformers.Trainer``
(:class:`DistillationTrainer`), the data it reads (:func:`prepare_distillation_data`) and its stages
(:class:`TrainerStages`), and the clean end of a launched run (:func:`leave_process_group`)."""

from sakd.integrations.data import DistillationCollator, DistillationData, prepare_distillation_data
from sakd.integrations.hf_trainer import DistillationTrainer
from sakd.integrations.trainer_stages import TrainerStages
from sakd.training.distributed import leave_process_group

__all__ = [
    "DistillationCollator",
    "DistillationData",
    "DistillationTrainer",
    "TrainerStages",
    "leave_process_group",
    "prepare_distillation_data",
]
