"""The config tree of a run: :mod:`.schema` (the typed, documented sections), :mod:`.loader` (recipes,
overrides, validation, dump), :mod:`.legacy_keys` (the old system's flat keys), :mod:`.deepspeed`
(DeepSpeed JSON configs filled from ours) and :mod:`.reference` (the README table)."""

from sakd.config.aware_schema import CurriculumConfig, MoEConfig, TokenRouterConfig
from sakd.config.generation import POLICIES, GenerationConfig
from sakd.config.loader import dump_config, load_config, parse_override, read_config_file, to_dict, validate
from sakd.config.schema import (
    AlignmentConfig,
    AttentionConfig,
    CacheConfig,
    ContrastiveConfig,
    DataConfig,
    DistillationConfig,
    FeatureConfig,
    LoggingConfig,
    LossConfig,
    ModelConfig,
    OptimizationConfig,
    PeftConfig,
    RunConfig,
    StageConfig,
    TrainingConfig,
    all_keys,
)
from sakd.errors import ConfigError

__all__ = [
    "AlignmentConfig",
    "AttentionConfig",
    "CacheConfig",
    "ConfigError",
    "ContrastiveConfig",
    "CurriculumConfig",
    "DataConfig",
    "DistillationConfig",
    "FeatureConfig",
    "GenerationConfig",
    "LoggingConfig",
    "LossConfig",
    "MoEConfig",
    "ModelConfig",
    "OptimizationConfig",
    "POLICIES",
    "PeftConfig",
    "RunConfig",
    "StageConfig",
    "TokenRouterConfig",
    "TrainingConfig",
    "all_keys",
    "dump_config",
    "load_config",
    "parse_override",
    "read_config_file",
    "to_dict",
    "validate",
]
