"""Readers for tab-separated files as GLUE ships them.

GLUE TSVs are not CSV: sentences contain unbalanced quote characters, so quoting is switched off (a stray
quote must never swallow the following lines). MRPC starts with a byte-order mark, hence "utf-8-sig".
CoLA has no header and keeps the sentence in column 3; every other file is read by header name. Other TSV
files (a user's own, `quoted=True`) are read as standard quoted TSV, as spreadsheets and pandas write them.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lmcompress.errors import DataError
from lmcompress.tasks.spec import RawRows, TaskSpec, find_columns


@dataclass(frozen=True)
class _Positions:
    """Where a header-less GLUE file keeps its fields."""

    fields: int
    text: int
    label: int


_HEADERLESS: dict[str, _Positions] = {"cola": _Positions(fields=4, text=3, label=1)}


def iter_tsv(path: Path, quoted: bool = False) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) for each non-blank line, quotes taken literally unless `quoted`."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE)
            for fields in reader:
                if fields and any(f.strip() for f in fields):
                    yield reader.line_num, fields
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except csv.Error as error:
        raise DataError(f"{path}: unreadable TSV ({error})") from None


def _check_width(path: Path, line: int, fields: list[str], expected: int) -> None:
    if len(fields) != expected:
        raise DataError(f"{path}: line {line}: expected {expected} tab-separated fields, found {len(fields)}")


def _has_header(first: list[str], task: TaskSpec) -> bool:
    return task.text_column in first and (task.label_column is None or task.label_column in first)


def _read_headerless(path: Path, rows: list[tuple[int, list[str]]], where: _Positions) -> RawRows:
    texts, labels, locations = [], [], []
    for line, fields in rows:
        _check_width(path, line, fields, where.fields)
        texts.append(fields[where.text].strip())
        labels.append(fields[where.label].strip())
        locations.append(f"line {line}")
    return RawRows(str(path), texts, None, labels, locations)


def _read_with_header(path: Path, rows: list[tuple[int, list[str]]], task: TaskSpec) -> RawRows:
    (_, header), body = rows[0], rows[1:]
    header = [name.strip() for name in header]
    text_col, pair_col, label_col = find_columns(task, header, str(path))
    text_at = header.index(text_col)
    label_at = None if label_col is None else header.index(label_col)
    pair_at = None if pair_col is None else header.index(pair_col)
    texts, pairs, labels, locations = [], [], [], []
    for line, fields in body:
        _check_width(path, line, fields, len(header))
        texts.append(fields[text_at].strip())
        labels.append("" if label_at is None else fields[label_at].strip())
        if pair_at is not None:
            pairs.append(fields[pair_at].strip())
        locations.append(f"line {line}")
    return RawRows(str(path), texts, None if pair_at is None else pairs, labels, locations)


def read_tsv(path: Path, task: TaskSpec, quoted: bool = False) -> RawRows:
    """Read a GLUE-format TSV file for `task`, or with `quoted` any headered TSV file with standard quoting."""
    rows = list(iter_tsv(path, quoted))
    if not rows:
        return RawRows(str(path), [], None, [], [])
    positions = _HEADERLESS.get(task.name)
    if positions is not None and not _has_header(rows[0][1], task):
        return _read_headerless(path, rows, positions)
    return _read_with_header(path, rows, task)
