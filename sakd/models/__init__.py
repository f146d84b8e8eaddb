"""Model presets and loading."""

from sakd.models.loading import ModelLoadError, freeze, load_model, load_tokenizer
from sakd.models.presets import PRESETS, build_preset_config, is_preset, preset_config_for

__all__ = [
    "PRESETS",
    "ModelLoadError",
    "build_preset_config",
    "preset_config_for",
    "freeze",
    "is_preset",
    "load_model",
    "load_tokenizer",
]
