"""Random access to the samples of a split through the DALI index files `dataprep` writes.

The loader picks samples itself (see `order`), so it reads each sample's members straight from the tar at
the offsets the `.idx` files record, instead of letting a DALI reader stream the tars in its own order.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from d3d_cluster.data.schema import Manifest


@dataclass(frozen=True)
class Member:
    tar: int  # position in SampleTable.tars
    offset: int
    size: int


class SampleTable:
    """Every sample of one split: its key, its RGB frame count and where each of its members lies."""

    def __init__(self, tars: list[Path], indexes: list[Path], frames: list[list[int]]):
        """`frames`: per shard, each sample's RGB frame count in the shard's order (the manifest's)."""
        self.tars = tars
        self.keys: list[str] = []
        self.members: list[dict[str, Member]] = []
        self.frames: list[int] = []
        for tar_number, (index, counts) in enumerate(zip(indexes, frames, strict=True)):
            self._read_index(tar_number, index)
            if len(self.keys) - len(self.frames) != len(counts):
                raise ValueError(f"{index}: {len(self.keys) - len(self.frames)} samples, the manifest lists "
                                 f"{len(counts)} frame counts for its shard")
            self.frames.extend(counts)
        self._handles: dict[int, int] = {}
        self._opening = threading.Lock()  # the loader reads on a reader thread; tests and probes on their own

    @classmethod
    def of_split(cls, manifest: Manifest, directory, split: str) -> SampleTable:
        tars, indexes = manifest.shard_paths(directory, split)
        return cls(tars, indexes, [shard.frames for shard in manifest.splits[split].shards])

    def _read_index(self, tar_number: int, index: Path) -> None:
        lines = index.read_text().splitlines()
        header = lines[0].split() if lines else []
        if len(header) != 2 or not header[0].startswith("v1"):
            raise ValueError(f"{index}: not a DALI webdataset index (header {lines[:1]!r})")
        first = len(self.keys)
        for line_number, line in enumerate(lines[1:], start=2):
            fields = line.split()
            if not fields or len(fields) % 4:
                raise ValueError(f"{index}:{line_number}: expected groups of 'ext offset size name'")
            members, key = {}, None
            for ext, offset, size, name in zip(*[iter(fields)] * 4):
                members[ext] = Member(tar_number, int(offset), int(size))
                key = name[: -len(ext) - 1]
            self.keys.append(key)
            self.members.append(members)
        if len(self.keys) - first != int(header[1]):
            raise ValueError(f"{index}: header says {header[1]} samples, found {len(self.keys) - first}")

    def __len__(self) -> int:
        return len(self.keys)

    def read(self, sample: int, ext: str) -> np.ndarray:
        """The raw bytes of one member as a uint8 array (what DALI's decoders take)."""
        member = self.members[sample].get(ext)
        if member is None:
            raise KeyError(f"sample {self.keys[sample]!r} has no {ext!r} member")
        handle = self._handles.get(member.tar)
        if handle is None:
            with self._opening:
                handle = self._handles.get(member.tar)
                if handle is None:
                    handle = self._handles[member.tar] = os.open(self.tars[member.tar], os.O_RDONLY)
        data = os.pread(handle, member.size, member.offset)  # no file position: safe from several threads
        if len(data) != member.size:
            raise OSError(f"{self.tars[member.tar]}: sample {self.keys[sample]!r} {ext} is truncated")
        return np.frombuffer(data, dtype=np.uint8)

    def label(self, sample: int) -> int:
        return int(self.read(sample, "cls").tobytes())

    def close(self) -> None:
        with self._opening:
            for handle in self._handles.values():
                os.close(handle)
            self._handles.clear()
