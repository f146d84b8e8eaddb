"""From text to batches: :mod:`.text` (datasets in; what one document of a .txt file is),
:mod:`.tokenize` (one row of tokens per document, cached), :mod:`.packing` (blocks, the paired packing for
two tokenizers), :mod:`.stream` (held-out text as one token stream, with byte counts), :mod:`.bundle` (the
run's train/held-out blocks and batches), :mod:`.batch_plan` (which blocks each rank reads at each step),
:mod:`.synthetic` (the demo corpus)."""

from sakd.data.batch_plan import BatchPlan
from sakd.data.bundle import DataBundle, make_batch, prepare_data, split_documents
from sakd.data.packing import pack, pack_pair
from sakd.data.stream import TokenStream, text_stream
from sakd.data.text import LOCAL_BUILDERS, SAMPLE_BY, load_text_dataset
from sakd.data.tokenize import tokenize_documents
from sakd.errors import DataError

__all__ = [
    "LOCAL_BUILDERS",
    "SAMPLE_BY",
    "BatchPlan",
    "DataBundle",
    "DataError",
    "TokenStream",
    "load_text_dataset",
    "make_batch",
    "pack",
    "pack_pair",
    "prepare_data",
    "split_documents",
    "text_stream",
    "tokenize_documents",
]
