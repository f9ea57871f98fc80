"""The `kinetics` source: Kinetics-400/600 annotation CSVs and the clips downloaded for them.

    annotations/   train.csv and validate.csv (DeepMind's release) or val.csv (the CVDF mirror's
                   annotations/ folder); columns label,youtube_id,time_start,time_end,split
                   (Kinetics-400 adds is_cc; extra columns are ignored)
    root/          the clips, named <youtube_id>_<time_start:06d>_<time_end:06d>.mp4, in any tree below:
                   per split (CVDF: train/, val/) or per class (the ActivityNet crawler: <label>/)

Rows whose split is "test" are skipped. The classes are the training rows' labels, sorted, whatever was
downloaded, so class indices do not depend on which clips YouTube still had. A listed clip with no file is
rejected as "missing"; one found in a class folder other than its label as "label mismatch".
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from d3d_cluster.spec import PrepSpec
from dataprep.sources.records import Dataset, Rejected, SourceError, VideoRecord

COLUMNS = ("label", "youtube_id", "time_start", "time_end", "split")
SPLIT_OF_ROW = {"train": "train", "val": "val", "validate": "val", "test": None}
VAL_FILES = ("validate.csv", "val.csv")
CLIP_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi")


def clip_name(youtube_id: str, start: int, end: int) -> str:
    return f"{youtube_id}_{start:06d}_{end:06d}"


def read(prep: PrepSpec, base: Path) -> Dataset:
    root, annotations = base / prep.root, base / prep.annotations
    val_file = next((annotations / name for name in VAL_FILES if (annotations / name).is_file()), None)
    if val_file is None:
        raise SourceError(f"{annotations}: no Kinetics validation annotations ({' or '.join(VAL_FILES)})")
    rows = read_annotations(annotations / "train.csv") + read_annotations(val_file)
    classes = sorted({label for label, _, split in rows if split == "train"})
    clips = index_clips(root)
    records, rejects = [], []
    for label, name, split in rows:
        found = clips.get(name)
        record = VideoRecord(found or root / f"{name}.mp4", label, split)
        folder = found.parent.name.replace("_", " ") if found else None
        if found is None:
            rejects.append(Rejected(record, "missing", f"no clip named {name} under {root}"))
        elif folder != label and folder in classes:
            rejects.append(Rejected(record, "label mismatch", f"annotated {label!r} but lies in folder {found.parent.name!r}"))
        else:
            records.append(record)
    return Dataset.checked(records, classes, root, rejects)


def read_annotations(path: Path) -> list[tuple[str, str, str]]:
    """(label, clip name, split) of every train and val row; a malformed row is an error naming file and line."""
    try:
        handle = open(path, newline="")
    except OSError as error:
        raise SourceError(f"{path}: cannot read Kinetics annotations: {error.strerror}") from None
    rows = []
    with handle:
        reader = csv.DictReader(handle)
        missing = [column for column in COLUMNS if column not in (reader.fieldnames or ())]
        if missing:
            raise SourceError(f"{path}:1: missing column(s) {', '.join(missing)} (expected {','.join(COLUMNS)})")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if row["split"] not in SPLIT_OF_ROW:
                raise SourceError(f"{where}: split must be one of {', '.join(SPLIT_OF_ROW)}, got {row['split']!r}")
            split = SPLIT_OF_ROW[row["split"]]
            if split is None:
                continue
            if not row["label"] or not row["youtube_id"]:
                raise SourceError(f"{where}: empty label or youtube_id")
            try:
                start, end = int(float(row["time_start"])), int(float(row["time_end"]))
            except (TypeError, ValueError):
                raise SourceError(f"{where}: time_start and time_end must be seconds, got "
                                  f"{row['time_start']!r}, {row['time_end']!r}") from None
            rows.append((row["label"], clip_name(row["youtube_id"], start, end), split))
    return rows


def index_clips(root: Path) -> dict[str, Path]:
    """Clip name -> file, for every video file below root; where a name occurs twice the first path in sorted order wins."""
    if not root.is_dir():
        raise SourceError(f"{root}: clip folder not found")
    clips: dict[str, Path] = {}
    for folder, subfolders, files in os.walk(root, followlinks=True):
        subfolders.sort()
        for name in sorted(files):
            path = Path(folder) / name
            if path.suffix in CLIP_SUFFIXES:
                clips.setdefault(path.stem, path)
    return clips
