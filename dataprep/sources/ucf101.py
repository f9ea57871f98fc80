"""The `ucf101` source: UCF-101 as distributed, videos in class folders and the official split lists.

    root/          UCF-101/ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi ...
    annotations/   ucfTrainTestlist/: classInd.txt         "1 ApplyEyeMakeup"
                                      trainlist0N.txt      "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1"
                                      testlist0N.txt       "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi"

`prep.split_number` (1-3) picks the lists; the test list becomes the val split. Class indices follow
classInd.txt. A listed video whose folder is not the class its list gives is rejected as "label mismatch",
one that is not on disk as "missing". Names are used exactly as listed: the lists and the archive agree
on every file name (including the one class whose files are spelt `v_HandStandPushups_...`).
"""

from __future__ import annotations

from pathlib import Path

from d3d_cluster.spec import PrepSpec
from dataprep.sources.records import Dataset, Rejected, SourceError, VideoRecord, class_folders, read_lines


def read(prep: PrepSpec, base: Path) -> Dataset:
    root, annotations = base / prep.root, base / prep.annotations
    classes = read_class_index(annotations / "classInd.txt")
    lists = [(annotations / f"trainlist{prep.split_number:02d}.txt", "train"),
             (annotations / f"testlist{prep.split_number:02d}.txt", "val")]
    listed = [(path, number, split, *_entry(path, number, text, classes))
              for path, split in lists for number, text in read_lines(path, "UCF-101 split list")]
    on_disk = class_folders(root)
    records, rejects = [], []
    for list_path, number, split, relative, label in listed:
        folder, _, name = relative.partition("/")
        record = VideoRecord(root / relative, label or folder, split)
        if label is not None and label != folder:
            rejects.append(Rejected(record, "label mismatch",
                                    f"{list_path}:{number}: listed as {label!r} but lies in folder {folder!r}"))
        elif name not in on_disk.get(folder, ()):
            rejects.append(Rejected(record, "missing", f"{list_path}:{number}: {relative} is not in {root}"))
        else:
            records.append(record)
    return Dataset.checked(records, classes, root, rejects)


def read_class_index(path: Path) -> list[str]:
    """classInd.txt as a list in index order; the indices must run 1..N."""
    classes = []
    for number, text in read_lines(path, "UCF-101 class index"):
        fields = text.split()
        if len(fields) != 2 or not fields[0].isdigit():
            raise SourceError(f"{path}:{number}: expected '<index> <class>', got {text!r}")
        if int(fields[0]) != len(classes) + 1:
            raise SourceError(f"{path}:{number}: index {fields[0]} out of order, expected {len(classes) + 1}")
        classes.append(fields[1])
    if not classes:
        raise SourceError(f"{path}: no classes listed")
    return classes


def _entry(path: Path, number: int, text: str, classes: list[str]) -> tuple[str, str | None]:
    """(class/file relative path, the class the line states or None where it states none)."""
    fields = text.split()
    if len(fields) not in (1, 2) or fields[0].count("/") != 1:
        raise SourceError(f"{path}:{number}: expected '<class>/<file> [<index>]', got {text!r}")
    if len(fields) == 1:
        return fields[0], None
    if not fields[1].isdigit() or not 1 <= int(fields[1]) <= len(classes):
        raise SourceError(f"{path}:{number}: class index {fields[1]!r} is not in 1..{len(classes)}")
    return fields[0], classes[int(fields[1]) - 1]
