"""What every source produces: the videos to prepare, the classes, and what it already had to reject."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence


class SourceError(ValueError):
    """A listing that cannot be read as its dataset defines it; the message names the file (and line)."""


@dataclass(frozen=True)
class VideoRecord:
    path: Path  # absolute
    label: str
    split: str  # one of d3d_cluster.data.schema.SPLITS


@dataclass(frozen=True)
class Rejected:
    """A listed video the source cannot use (missing, or labelled against its own tree)."""

    record: VideoRecord
    reason: str  # a short category, counted in the summary: "missing", "label unknown", "label mismatch"
    detail: str


@dataclass
class Dataset:
    """A source's output. Class indices in the shards are positions in `classes`, so their order is the
    dataset's own where it defines one (UCF-101's classInd.txt) and sorted otherwise."""

    records: list[VideoRecord]
    classes: list[str]
    root: Path  # shard metadata names each video relative to this
    rejects: list[Rejected] = field(default_factory=list)

    @classmethod
    def checked(cls, records: list[VideoRecord], classes: list[str], root: Path,
                rejects: Sequence[Rejected] = ()) -> "Dataset":
        """Moves records whose label is not a class (nothing to train it on) into the rejects."""
        known = set(classes)
        kept = [record for record in records if record.label in known]
        unknown = [
            Rejected(record, "label unknown", f"{record.label!r} is not one of the {len(classes)} classes")
            for record in records
            if record.label not in known
        ]
        return cls(kept, list(classes), Path(root), [*rejects, *unknown])


def read_lines(path: Path, what: str) -> list[tuple[int, str]]:
    """(line number, stripped text) of the non-blank lines; a file that cannot be read is an error naming it."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SourceError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise SourceError(f"{path}: cannot read {what}: {error}") from None
    return [(number, line.strip()) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]


def class_folders(root: Path) -> dict[str, set[str]]:
    """File names in each sub-folder of root: the tree of UCF-101 and HMDB-51, read without a stat per file."""
    if not root.is_dir():
        raise SourceError(f"{root}: video folder not found")
    return {
        folder.name: {entry.name for entry in _scandir(folder) if entry.is_file()}
        for folder in sorted(_scandir(root), key=lambda entry: entry.name)
        if folder.is_dir()
    }


def _scandir(path: Path) -> list[os.DirEntry]:
    with os.scandir(path) as entries:
        return list(entries)
