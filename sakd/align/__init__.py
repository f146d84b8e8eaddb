"""Cross-tokenizer alignment for distillation between different vocabularies."""

from .token_bytes import token_bytes
from .vocab import VocabMap, build_vocab_map, first_piece_map, load_or_build_vocab_map

__all__ = ["VocabMap", "build_vocab_map", "first_piece_map", "load_or_build_vocab_map", "token_bytes"]
