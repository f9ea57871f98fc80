"""Random access to the samples of a split through the DALI index files `dataprep` writes.

The loader picks samples itself (see `order`), so it reads each sample's members straight from the tar at
the offsets the `.idx` files record, instead of letting a DALI reader stream the tars in its own order.

A split can have thousands of shards, so only the most recently read `max_open` stay open. The OS failing to read
a shard (EMFILE, EIO, a stale NFS handle) says nothing about its data: it is retried, and if it persists it is a
`ShardReadError`, which the loader lets fail the step instead of counting the sample corrupt.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from d3d_cluster.data.schema import Manifest

MAX_OPEN = 64
RETRY_PAUSES = (0.1, 0.5)  # seconds before the second and the third try


class ShardReadError(OSError):
    """The OS could not read a shard, try after try: its data may well be sound, so no sample is blamed."""


@dataclass(frozen=True)
class Member:
    tar: int  # position in SampleTable.tars
    offset: int
    size: int


@dataclass
class _Open:
    fd: int
    readers: int = 0  # preads under way: an evicted descriptor is closed by the last of them


class SampleTable:
    """Every sample of one split: its key, its RGB frame count and where each of its members lies."""

    def __init__(self, tars: list[Path], indexes: list[Path], frames: list[list[int]], max_open: int = MAX_OPEN):
        """`frames`: per shard, each sample's RGB frame count in the shard's order (the manifest's). `max_open`: shard
        descriptors kept open (one more per other thread reading at the same time, until its read ends)."""
        self.tars, self.max_open = tars, max_open
        self.keys: list[str] = []
        self.members: list[dict[str, Member]] = []
        self.frames: list[int] = []
        for tar_number, (index, counts) in enumerate(zip(indexes, frames, strict=True)):
            self._read_index(tar_number, index)
            if len(self.keys) - len(self.frames) != len(counts):
                raise ValueError(f"{index}: {len(self.keys) - len(self.frames)} samples, the manifest lists "
                                 f"{len(counts)} frame counts for its shard")
            self.frames.extend(counts)
        self._open: OrderedDict[int, _Open] = OrderedDict()  # by tar, least recently read first
        self._lock = threading.Lock()  # the loader reads on a reader thread; tests and probes on their own

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
        for pause in (*RETRY_PAUSES, None):
            try:
                data = self._pread(member)
                break
            except OSError as error:
                if pause is None:
                    raise ShardReadError(error.errno, f"{self.tars[member.tar]}: sample {self.keys[sample]!r} {ext} "
                                         f"could not be read in {len(RETRY_PAUSES) + 1} tries "
                                         f"({error.strerror or error})") from error
                time.sleep(pause)
        if len(data) != member.size:  # the shard itself is short: its data is bad, not the OS
            raise OSError(f"{self.tars[member.tar]}: sample {self.keys[sample]!r} {ext} is truncated")
        return np.frombuffer(data, dtype=np.uint8)

    def _pread(self, member: Member) -> bytes:
        with self._lock:
            handle = self._open.get(member.tar)
            if handle is None:
                if len(self._open) >= self.max_open:
                    self._release(*self._open.popitem(last=False))
                handle = self._open[member.tar] = _Open(os.open(self.tars[member.tar], os.O_RDONLY))
            else:
                self._open.move_to_end(member.tar)
            handle.readers += 1
        try:
            return os.pread(handle.fd, member.size, member.offset)  # no file position: safe from several threads
        except OSError:
            with self._lock:  # a failed descriptor (a stale NFS handle) is not reused: the next try opens the shard
                if self._open.get(member.tar) is handle:
                    del self._open[member.tar]
            raise
        finally:
            with self._lock:
                handle.readers -= 1
                self._release(member.tar, handle)

    def _release(self, tar: int, handle: _Open) -> None:
        """Close `handle` if it left the open set and no pread uses it; the lock is held."""
        if not handle.readers and self._open.get(tar) is not handle:
            os.close(handle.fd)

    def label(self, sample: int) -> int:
        return int(self.read(sample, "cls").tobytes())

    def close(self) -> None:
        with self._lock:
            while self._open:
                self._release(*self._open.popitem())
