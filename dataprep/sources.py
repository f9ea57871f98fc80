"""The raw-video source: a labels CSV of `path,label[,split]`, as the synthetic source writes it.

A class is defined by its training videos: a label seen only in val cannot be learned, so it is not a
class, and prepare rejects those videos as "label unknown".
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from d3d_cluster.data.schema import SPLITS


@dataclass(frozen=True)
class VideoRecord:
    path: Path  # absolute, resolved against the CSV's folder
    label: str
    split: str


def read_labels_csv(path: str | Path) -> tuple[list[VideoRecord], list[str]]:
    """Records in CSV order and the sorted classes; any malformed row is an error naming file and line."""
    path = Path(path)
    root = path.resolve().parent
    try:
        handle = open(path, newline="")
    except OSError as error:
        raise ValueError(f"{path}: cannot read labels CSV: {error.strerror}") from None
    with handle:
        reader = csv.reader(handle)
        header = [name.strip() for name in next(reader, [])]
        if header not in (["path", "label"], ["path", "label", "split"]):
            raise ValueError(f"{path}:1: header must be path,label[,split], got {','.join(header)!r}")
        records = []
        for row in reader:
            line = reader.line_num
            if not row:
                continue
            if len(row) != len(header):
                raise ValueError(f"{path}:{line}: expected {len(header)} fields ({','.join(header)}), got {len(row)}")
            fields = [value.strip() for value in row]
            video, label = fields[0], fields[1]
            split = fields[2] if len(fields) == 3 else "train"
            if not video or not label:
                raise ValueError(f"{path}:{line}: empty path or label")
            if split not in SPLITS:
                raise ValueError(f"{path}:{line}: split must be one of {', '.join(SPLITS)}, got {split!r}")
            records.append(VideoRecord(root / video, label, split))
    if not records:
        raise ValueError(f"{path}: no videos listed")
    trained = {record.label for record in records if record.split == "train"}
    return records, sorted(trained or {record.label for record in records})
