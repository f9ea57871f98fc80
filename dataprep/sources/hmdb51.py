"""The `hmdb51` source: HMDB-51 as distributed, videos in class folders, one split file per class and split.

    root/          hmdb51_org/brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi ...
    annotations/   testTrainMulti_7030_splits/brush_hair_test_split1.txt   "<video file> <1|2|0>"

In split file N of a class, 1 puts the video in train, 2 in the test split (val here), 0 in neither.
The classes are the split files' class names, sorted. A listed video that lies in another class's
folder is rejected as "label mismatch", one that is in no folder as "missing".
"""

from __future__ import annotations

from pathlib import Path

from d3d_cluster.spec import PrepSpec
from dataprep.sources.records import Dataset, Rejected, SourceError, VideoRecord, class_folders, read_lines

SPLIT_OF_ID = {"1": "train", "2": "val", "0": None}


def read(prep: PrepSpec, base: Path) -> Dataset:
    root, annotations = base / prep.root, base / prep.annotations
    suffix = f"_test_split{prep.split_number}.txt"
    if not annotations.is_dir():
        raise SourceError(f"{annotations}: HMDB-51 split folder not found")
    split_files = sorted(path for path in annotations.iterdir() if path.name.endswith(suffix))
    if not split_files:
        raise SourceError(f"{annotations}: no HMDB-51 split files named <class>{suffix}")
    classes = [path.name[: -len(suffix)] for path in split_files]
    on_disk = class_folders(root)
    records, rejects = [], []
    for split_file, label in zip(split_files, classes):
        for number, text in read_lines(split_file, "HMDB-51 split file"):
            fields = text.split()
            if len(fields) != 2 or fields[1] not in SPLIT_OF_ID:
                raise SourceError(f"{split_file}:{number}: expected '<video> <0|1|2>', got {text!r}")
            name, split = fields[0], SPLIT_OF_ID[fields[1]]
            if split is None:
                continue
            record = VideoRecord(root / label / name, label, split)
            if name in on_disk.get(label, ()):
                records.append(record)
                continue
            elsewhere = [folder for folder, names in on_disk.items() if name in names]
            if elsewhere:
                rejects.append(Rejected(record, "label mismatch",
                                        f"{split_file}:{number}: listed as {label!r} but lies in {', '.join(elsewhere)}"))
            else:
                rejects.append(Rejected(record, "missing", f"{split_file}:{number}: {name} is in no class folder of {root}"))
    return Dataset.checked(records, classes, root, rejects)
