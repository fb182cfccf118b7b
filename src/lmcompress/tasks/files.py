"""Generic task data: CSV, JSON lines / JSON, folders of split files, and Hugging Face `datasets`.

Everything is reduced to `RawRows` (label values as strings) so label mapping and its errors are shared with
the GLUE reader. `datasets` is imported only when a saved or hub dataset is actually used, because the import
alone costs seconds.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lmcompress.errors import DataError, first_line
from lmcompress.tasks.spec import RawRows, TaskSpec, find_columns

SPLIT_FILE_SUFFIXES: tuple[str, ...] = (".tsv", ".csv", ".jsonl", ".json")
DEV_SPLIT_NAMES: tuple[str, ...] = ("validation", "validation_matched", "dev", "test")
_SPLIT_STEMS: dict[str, tuple[str, ...]] = {"train": ("train",), "dev": ("dev", "validation")}
# The hub moved the canonical GLUE dataset; "hf:glue/sst2" still means the GLUE benchmark.
_HUB_RENAMES: dict[str, str] = {"glue": "nyu-mll/glue"}


def split_file(folder: Path, split: str) -> Path:
    """The file holding `split` in a folder: GLUE's <split>.tsv first, then other formats."""
    for stem in _SPLIT_STEMS[split]:
        for suffix in SPLIT_FILE_SUFFIXES:
            candidate = folder / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    others = [f"{stem}{suffix}" for stem in _SPLIT_STEMS[split] for suffix in SPLIT_FILE_SUFFIXES][1:]
    raise DataError(f"{folder}: missing file {split}.tsv (also looked for {', '.join(others)})")


def cell_text(value: Any) -> str:
    """A cell as a stripped string; JSON null is empty and whole floats (1.0) read as their integer."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def rows_from_records(records: Iterable[tuple[str, Mapping[str, Any]]], columns: Sequence[str],
                      task: TaskSpec, source: str) -> RawRows:
    """Build rows from (location, record) pairs; `columns` are the ones the source declares."""
    text_col, pair_col, label_col = find_columns(task, columns, source)
    texts, pairs, labels, locations = [], [], [], []
    for where, record in records:
        for column in (text_col, pair_col, label_col):
            if column is not None and column not in record:
                raise DataError(f"{source}: {where}: missing column '{column}' "
                                f"(columns: {', '.join(map(str, record))})")
        texts.append(cell_text(record[text_col]))
        labels.append("" if label_col is None else cell_text(record[label_col]))
        if pair_col is not None:
            pairs.append(cell_text(record[pair_col]))
        locations.append(where)
    return RawRows(source, texts, None if pair_col is None else pairs, labels, locations)


def _csv_records(path: Path) -> tuple[list[str], list[tuple[str, dict[str, str]]]]:
    """Header and records of a CSV file; quoted fields may span lines, as in any spreadsheet export."""
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        header = [name.strip() for name in next(reader, [])]
        records = []
        for fields in reader:
            if not any(f.strip() for f in fields):
                continue
            if len(fields) != len(header):
                raise DataError(f"{path}: line {reader.line_num}: expected {len(header)} "
                                f"comma-separated fields, found {len(fields)}")
            records.append((f"line {reader.line_num}", dict(zip(header, fields, strict=True))))
    return header, records


def read_csv(path: Path, task: TaskSpec) -> RawRows:
    """A CSV file with a header row, columns found by name."""
    try:
        header, records = _csv_records(path)
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except csv.Error as error:
        raise DataError(f"{path}: unreadable CSV ({error})") from None
    if not header:
        return RawRows(str(path), [], None, [], [])
    return rows_from_records(records, header, task, str(path))


def _json_records(path: Path) -> list[tuple[str, Any]]:
    """Records of a JSON-lines file, or of a .json file holding a list of objects."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    if path.suffix.lower() == ".json":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # not one JSON document: read it as JSON lines below
        if isinstance(whole, list):
            return [(f"record {i + 1}", item) for i, item in enumerate(whole)]
        if whole is not None:
            raise DataError(f"{path}: expected a JSON list of objects or JSON lines, found a {type(whole).__name__}")
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: line {number}: invalid JSON ({error.msg})") from None
    return records


def read_json(path: Path, task: TaskSpec) -> RawRows:
    """A JSON-lines file (or a JSON list) of objects, one example each."""
    records = _json_records(path)
    for where, record in records:
        if not isinstance(record, dict):
            raise DataError(f"{path}: {where}: expected a JSON object, found a {type(record).__name__}")
    if not records:
        return RawRows(str(path), [], None, [], [])
    return rows_from_records(records, list(records[0][1]), task, str(path))


def read_file(path: Path, task: TaskSpec) -> RawRows:
    """A single CSV / JSON file, used as given whatever the split."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return read_csv(path, task)
    if suffix in (".jsonl", ".json"):
        return read_json(path, task)
    raise DataError(f"{path}: unsupported data file type '{suffix or path.name}' "
                    "(use .tsv, .csv, .jsonl or .json)")


def is_saved_dataset(folder: Path) -> bool:
    """Whether `folder` was written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return (folder / "dataset_dict.json").is_file() or (
        (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()
    )


def _pick_split(splits: Sequence[str], split: str, source: str) -> str:
    wanted = ("train",) if split == "train" else DEV_SPLIT_NAMES
    for name in wanted:
        if name in splits:
            return name
    raise DataError(f"{source}: no split for '{split}' (looked for {', '.join(wanted)}; "
                    f"splits: {', '.join(splits)})")


def _class_names(dataset: Any, column: str) -> tuple[str, ...] | None:
    """Label names a `datasets` ClassLabel column declares, if it is one."""
    names = getattr(dataset.features.get(column), "names", None)
    return tuple(names) if names else None


def rows_from_dataset(dataset: Any, task: TaskSpec, source: str) -> RawRows:
    """Rows of a `datasets.Dataset`, with ClassLabel ids turned back into their names."""
    text_col, pair_col, label_col = find_columns(task, dataset.column_names, source)
    names = None if label_col is None else _class_names(dataset, label_col)
    raw_labels = [""] * len(dataset) if label_col is None else dataset[label_col]
    if names is not None:
        raw_labels = [names[v] if isinstance(v, int) and 0 <= v < len(names) else v for v in raw_labels]
    pairs = None if pair_col is None else [cell_text(v) for v in dataset[pair_col]]
    return RawRows(
        source=source,
        texts=[cell_text(v) for v in dataset[text_col]],
        text_pairs=pairs,
        labels=[cell_text(v) for v in raw_labels],
        locations=[f"row {i}" for i in range(len(dataset))],
        label_names=names,
    )


def _dataset_split(loaded: Any, split: str, source: str) -> tuple[Any, str]:
    """The Dataset for `split` out of a Dataset (used as is) or a DatasetDict."""
    if not isinstance(loaded, Mapping):  # a DatasetDict is a dict of splits; a Dataset is not
        return loaded, source
    chosen = _pick_split(list(loaded), split, source)
    return loaded[chosen], f"{source} [{chosen}]"


def read_saved_dataset(folder: Path, task: TaskSpec, split: str) -> RawRows:
    """A folder written by `save_to_disk`."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as error:  # any datasets failure is a data problem to the user
        raise DataError(f"{folder}: could not load saved dataset: {first_line(error)}") from None
    dataset, source = _dataset_split(loaded, split, str(folder))
    return rows_from_dataset(dataset, task, source)


def _hub_name_and_config(spec: str) -> tuple[str, str | None]:
    """'glue/sst2' -> ('nyu-mll/glue', 'sst2'); 'owner/name/config' -> ('owner/name', 'config')."""
    parts = spec.strip().strip("/").split("/")
    if len(parts) == 1:
        return parts[0], None
    name = "/".join(parts[:-1])
    return _HUB_RENAMES.get(name, name), parts[-1]


def read_hub_dataset(spec: str, task: TaskSpec, split: str) -> RawRows:
    """Download (or read from the local cache) a hub dataset 'NAME' or 'NAME/CONFIG'."""
    name, config = _hub_name_and_config(spec)
    try:
        import datasets

        loaded = datasets.load_dataset(name, config)
    except Exception as error:  # network, missing dataset, bad config: all reported the same way
        raise DataError(f"could not load dataset '{spec}' from the Hugging Face hub (offline?): "
                        f"{first_line(error)}") from None
    dataset, source = _dataset_split(loaded, split, f"hf:{spec}")
    return rows_from_dataset(dataset, task, source)
