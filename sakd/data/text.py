"""Text in: a local .txt/.jsonl/.json/.parquet file or a hub dataset, as a `datasets.Dataset` with one
``text`` column (one row per document), every problem a one-line :class:`~sakd.errors.DataError`."""

from __future__ import annotations

from pathlib import Path

import datasets

from sakd.errors import DataError

LOCAL_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def load_text_dataset(
    spec: str, *, split: str = "train", text_field: str = "text", dataset_config: str | None = None
) -> datasets.Dataset:
    """A `datasets.Dataset` with one ``text`` column, from a local file or a hub dataset name."""
    path = Path(spec).expanduser()
    if path.suffix in LOCAL_BUILDERS or path.exists() or spec.startswith((".", "/", "~")):
        if not path.exists():
            raise DataError(f"data file not found: {spec}")
        if path.is_dir():
            raise DataError(f"data path is a directory; give a .txt, .jsonl or .parquet file: {spec}")
        builder = LOCAL_BUILDERS.get(path.suffix)
        if builder is None:
            raise DataError(
                f"unsupported data file type '{path.suffix}' ({spec}); use .txt, .jsonl or .parquet"
            )
        try:
            with path.open("rb") as fh:
                fh.read(1)
        except OSError as e:
            raise DataError(f"cannot read data file {spec}: {e.strerror}") from None
        if path.stat().st_size == 0:
            raise DataError(f"data file is empty: {spec}")
        try:
            ds = datasets.load_dataset(builder, data_files={"train": str(path)}, split="train")
        except Exception as e:  # datasets raises many types for malformed files
            raise DataError(f"cannot parse data file {spec} as {builder}: {str(e).splitlines()[0]}") from None
    else:
        try:
            ds = datasets.load_dataset(spec, dataset_config, split=split)
        except Exception as e:
            raise DataError(f"cannot load dataset '{spec}': {str(e).splitlines()[0]}") from None
    if text_field not in ds.column_names:
        raise DataError(
            f"dataset {spec} has no column '{text_field}' (columns: {', '.join(ds.column_names)}); set data.text_field"
        )
    ds = ds.select_columns([text_field])
    if text_field != "text":
        ds = ds.rename_column(text_field, "text")
    return ds.filter(lambda t: bool(t and t.strip()), input_columns="text")
