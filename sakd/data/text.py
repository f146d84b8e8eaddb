"""Text in: a local .txt/.jsonl/.json/.parquet file or a hub dataset, as a `datasets.Dataset` with one
``text`` column (one row per document), every problem a one-line :class:`~sakd.errors.DataError`.

What a document is in a ``.txt`` file is the ``sample_by`` option of `datasets`' own ``text`` builder:
``document`` (the whole file, the default: a book, an article, a source file is one text), ``paragraph``
(blank-line separated: ``text.split("\\n\\n")``) or ``line`` (one document per line). Line breaks inside a
document are kept. ``.jsonl``/``.json``/``.parquet`` files and hub datasets have one document per record.
"""

from __future__ import annotations

from pathlib import Path

import datasets

from sakd.config.schema import SAMPLE_BY
from sakd.errors import DataError

LOCAL_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _builder_options(builder: str, sample_by: str, spec: str) -> dict[str, object]:
    if builder == "text":
        # in line mode the line break is the document boundary; otherwise it is text and stays
        return {"sample_by": sample_by, "keep_linebreaks": sample_by != "line"}
    if sample_by != "document":
        raise DataError(
            f"data.sample_by={sample_by} applies to .txt files; the records of {spec} are its documents "
            "(leave data.sample_by at document)"
        )
    return {}


def load_records(
    spec: str, *, split: str = "train", dataset_config: str | None = None, sample_by: str = "document"
) -> datasets.Dataset:
    """The raw rows of a local file or a hub dataset (every column), each problem a one-line DataError."""
    if sample_by not in SAMPLE_BY:
        raise DataError(f"sample_by must be one of {', '.join(SAMPLE_BY)}, got {sample_by!r}")
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
        options = _builder_options(builder, sample_by, spec)
        try:
            return datasets.load_dataset(builder, data_files={"train": str(path)}, split="train", **options)
        except Exception as e:  # datasets raises many types for malformed files
            raise DataError(f"cannot parse data file {spec} as {builder}: {str(e).splitlines()[0]}") from None
    _builder_options("hub", sample_by, spec)
    try:
        return datasets.load_dataset(spec, dataset_config, split=split)
    except Exception as e:
        raise DataError(f"cannot load dataset '{spec}': {str(e).splitlines()[0]}") from None


def select_field(ds: datasets.Dataset, spec: str, name: str, key: str) -> datasets.Dataset:
    """``ds`` with only column ``name``, or a one-line DataError naming the columns and ``key`` to set."""
    if name not in ds.column_names:
        raise DataError(
            f"dataset {spec} has no column '{name}' (columns: {', '.join(ds.column_names)}); set {key}"
        )
    return ds.select_columns([name])


def load_text_dataset(
    spec: str,
    *,
    split: str = "train",
    text_field: str = "text",
    dataset_config: str | None = None,
    sample_by: str = "document",
) -> datasets.Dataset:
    """A `datasets.Dataset` with one ``text`` column, from a local file or a hub dataset name.

    ``sample_by`` says what one document of a ``.txt`` file is (see the module docstring).
    """
    ds = load_records(spec, split=split, dataset_config=dataset_config, sample_by=sample_by)
    ds = select_field(ds, spec, text_field, "data.text_field")
    if text_field != "text":
        ds = ds.rename_column(text_field, "text")
    return ds.filter(lambda t: bool(t and t.strip()), input_columns="text")
