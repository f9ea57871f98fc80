"""The `csv` source: a user's own videos listed as `path,label[,split]`, paths relative to the CSV.

A class is defined by its training videos: a label seen only in val cannot be learned, so it is not a
class, and its videos are rejected as "label unknown".
"""

from __future__ import annotations

import csv
from pathlib import Path

from d3d_cluster.data.schema import SPLITS
from d3d_cluster.spec import PrepSpec
from dataprep.sources.records import Dataset, SourceError, VideoRecord


def read(prep: PrepSpec, base: Path) -> Dataset:
    return read_labels_csv(base / prep.labels)


def read_labels_csv(path: str | Path) -> Dataset:
    """Records in CSV order and the sorted classes; any malformed row is an error naming file and line."""
    path = Path(path)
    root = path.resolve().parent
    try:
        handle = open(path, newline="")
    except OSError as error:
        raise SourceError(f"{path}: cannot read labels CSV: {error.strerror}") from None
    with handle:
        reader = csv.reader(handle)
        header = [name.strip() for name in next(reader, [])]
        if header not in (["path", "label"], ["path", "label", "split"]):
            raise SourceError(f"{path}:1: header must be path,label[,split], got {','.join(header)!r}")
        records = []
        for row in reader:
            line = reader.line_num
            if not row:
                continue
            if len(row) != len(header):
                raise SourceError(f"{path}:{line}: expected {len(header)} fields ({','.join(header)}), got {len(row)}")
            fields = [value.strip() for value in row]
            video, label = fields[0], fields[1]
            split = fields[2] if len(fields) == 3 else "train"
            if not video or not label:
                raise SourceError(f"{path}:{line}: empty path or label")
            if split not in SPLITS:
                raise SourceError(f"{path}:{line}: split must be one of {', '.join(SPLITS)}, got {split!r}")
            records.append(VideoRecord(root / video, label, split))
    if not records:
        raise SourceError(f"{path}: no videos listed")
    trained = {record.label for record in records if record.split == "train"}
    return Dataset.checked(records, sorted(trained or {record.label for record in records}), root)
