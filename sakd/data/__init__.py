"""From text to batches: :mod:`.text` (datasets in), :mod:`.packing` (tokens, blocks, the paired
packing for two tokenizers), :mod:`.bundle` (the run's train/held-out blocks and batches),
:mod:`.batch_plan` (which blocks each rank reads at each step), :mod:`.synthetic` (the demo corpus)."""

from sakd.data.batch_plan import BatchPlan
from sakd.data.bundle import DataBundle, make_batch, prepare_data, split_documents
from sakd.data.packing import pack, pack_pair
from sakd.data.text import LOCAL_BUILDERS, load_text_dataset
from sakd.errors import DataError

__all__ = [
    "LOCAL_BUILDERS",
    "BatchPlan",
    "DataBundle",
    "DataError",
    "load_text_dataset",
    "make_batch",
    "pack",
    "pack_pair",
    "prepare_data",
    "split_documents",
]
