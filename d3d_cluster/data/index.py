"""Random access to the samples of a split through the DALI index files `dataprep` writes.

The loader picks samples itself (see `order`), so it reads each sample's members straight from the tar at
the offsets the `.idx` files record, instead of letting a DALI reader stream the tars in its own order.

The table is columnar (numpy arrays of offsets, sizes, checksums, frame counts and labels; keys in one buffer), so a
Kinetics-700 split of 550k samples costs tens of MB per rank, not the GB a dict per sample would.

A split can have thousands of shards, so only the most recently read `max_open` stay open. The OS failing to read
a shard (EMFILE, EIO, a stale NFS handle) says nothing about its data: it is retried, and if it persists it is a
`ShardReadError`, which the loader lets fail the step instead of counting the sample corrupt. A member whose bytes
differ from what prep wrote (`CorruptMember`) is the data's fault: the loader skips its sample.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from d3d_cluster.data.schema import LABEL_EXT, member_checksum

if TYPE_CHECKING:
    from d3d_cluster.data.schema import Manifest

MAX_OPEN = 64
RETRY_PAUSES = (0.1, 0.5)  # seconds before the second and the third try
MAX_MEMBER_SIZE = 2**32 - 1  # sizes are held as uint32
NO_LABEL = -1  # a sample of a schema 2 shard: its label is read from its `cls` member


class ShardReadError(OSError):
    """The OS could not read a shard, try after try: its data may well be sound, so no sample is blamed."""


class CorruptMember(ValueError):
    """A member's bytes are not those prep wrote (its checksum differs): the sample is bad, the OS is not to blame."""


@dataclass(frozen=True)
class Member:
    tar: int  # position in SampleTable.tars
    offset: int
    size: int


@dataclass
class _Open:
    fd: int
    readers: int = 0  # preads under way: an evicted descriptor is closed by the last of them


class _Column:
    """One member ext across the split: where each sample's member lies and what prep recorded of its bytes."""

    def __init__(self, samples: int, tars: int):
        self.offsets = np.full(samples, -1, dtype=np.int64)  # -1: the sample has no such member
        self.sizes = np.zeros(samples, dtype=np.uint32)
        self.checksums = np.zeros(samples, dtype=np.uint32)
        self.checked = np.zeros(tars, dtype=bool)  # by tar: whether the manifest lists its checksums


class Keys(Sequence):
    """Sample keys as one UTF-8 buffer and its end offsets: `keys[i]` is a str, built when asked for."""

    def __init__(self, keys: list[str]):
        encoded = [key.encode() for key in keys]
        self._buffer = b"".join(encoded)
        self._ends = np.cumsum([len(key) for key in encoded], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, sample: int) -> str:
        sample = range(len(self))[sample]  # IndexError past the end (which ends iteration), negative from the end
        start = int(self._ends[sample - 1]) if sample else 0
        return self._buffer[start:int(self._ends[sample])].decode()


class _Members(Sequence):
    """`members[s]`: sample s's members by ext, as `Member`s, built when asked for."""

    def __init__(self, table: "SampleTable"):
        self._table = table

    def __len__(self) -> int:
        return len(self._table)

    def __getitem__(self, sample: int) -> dict[str, Member]:
        tar = int(self._table.tar_of[sample])
        return {ext: Member(tar, int(column.offsets[sample]), int(column.sizes[sample]))
                for ext, column in self._table.columns.items() if column.offsets[sample] >= 0}


class SampleTable:
    """Every sample of one split: its key, its RGB frame count, its label and where each of its members lies."""

    def __init__(self, tars: list[Path], indexes: list[Path], frames: list[list[int]], *,
                 labels: list[list[int] | None] | None = None,
                 checksums: list[dict[str, list[int]] | None] | None = None, max_open: int = MAX_OPEN):
        """Per shard, in the shard's order (the manifest's): each sample's RGB frame count (`frames`), label
        (`labels`) and, by member ext, checksum (`checksums`); None for a shard without (schema 2). `max_open`: shard
        descriptors kept open (one more per other thread reading at the same time, until its read ends)."""
        self.tars, self.max_open = tars, max_open
        labels = labels or [None] * len(tars)
        checksums = checksums or [None] * len(tars)
        total = sum(map(len, frames))
        self.tar_of = np.empty(total, dtype=np.int32)
        self.frames = np.empty(total, dtype=np.int32)
        self.labels = np.full(total, NO_LABEL, dtype=np.int32)
        self.columns: dict[str, _Column] = {}
        names: list[str] = []
        for tar_number, (index, shard_frames, shard_labels, shard_checksums) in enumerate(
                zip(indexes, frames, labels, checksums, strict=True)):
            shard_names, members = _parse_index(index)
            for what, values in (("frame counts", shard_frames), ("labels", shard_labels),
                                 *((f"{ext} checksums", v) for ext, v in (shard_checksums or {}).items())):
                if values is not None and len(values) != len(shard_names):
                    raise ValueError(f"{index}: {len(shard_names)} samples, the manifest lists {len(values)} {what} "
                                     f"for its shard")
            rows = slice(len(names), len(names) + len(shard_names))
            self.tar_of[rows], self.frames[rows] = tar_number, shard_frames
            if shard_labels is not None:
                self.labels[rows] = shard_labels
            for ext, (offsets, sizes) in members.items():
                if max(sizes) > MAX_MEMBER_SIZE:
                    raise ValueError(f"{index}: a {ext} member of over {MAX_MEMBER_SIZE} bytes")
                if ext not in self.columns:
                    self.columns[ext] = _Column(total, len(tars))
                column = self.columns[ext]
                column.offsets[rows], column.sizes[rows] = offsets, sizes
                if shard_checksums is not None and ext in shard_checksums:
                    column.checksums[rows], column.checked[tar_number] = shard_checksums[ext], True
            names += shard_names
        self.keys = Keys(names)
        self.members = _Members(self)
        self._open: OrderedDict[int, _Open] = OrderedDict()  # by tar, least recently read first
        self._lock = threading.Lock()  # the loader reads on a reader thread; tests and probes on their own

    @classmethod
    def of_split(cls, manifest: Manifest, directory, split: str) -> SampleTable:
        tars, indexes = manifest.shard_paths(directory, split)
        shards = manifest.splits[split].shards
        return cls(tars, indexes, [shard.frames for shard in shards], labels=[shard.labels for shard in shards],
                   checksums=[shard.checksums for shard in shards])

    def __len__(self) -> int:
        return len(self.tar_of)

    def read(self, sample: int, ext: str) -> np.ndarray:
        """The raw bytes of one member as a uint8 array (what DALI's decoders take), checked against its checksum."""
        column = self.columns.get(ext)
        if column is None or column.offsets[sample] < 0:
            raise KeyError(f"sample {self.keys[sample]!r} has no {ext!r} member")
        member = Member(int(self.tar_of[sample]), int(column.offsets[sample]), int(column.sizes[sample]))
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
        if column.checked[member.tar] and (found := member_checksum(data)) != column.checksums[sample]:
            raise CorruptMember(f"{self.tars[member.tar]}: sample {self.keys[sample]!r} member {ext}: CRC-32 "
                                f"{found:08x}, the manifest records {int(column.checksums[sample]):08x} (damaged "
                                f"after prep)")
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
        """From memory; a schema 2 shard's sample from its `cls` member."""
        label = int(self.labels[sample])
        return label if label != NO_LABEL else int(self.read(sample, LABEL_EXT).tobytes())

    def close(self) -> None:
        with self._lock:
            while self._open:
                self._release(*self._open.popitem())


def _parse_index(index: Path) -> tuple[list[str], dict[str, tuple[list[int], list[int]]]]:
    """A DALI webdataset index: its sample keys, and by member ext each sample's (offsets, sizes). Every line lists
    the same members in the same order, as `dataprep` writes them; that lets the whole file be split at once (a
    Kinetics-700 split has 17k of them to read at start-up)."""
    header_line, _, body = index.read_text().partition("\n")
    header = header_line.split()
    if len(header) != 2 or not header[0].startswith("v1"):
        raise ValueError(f"{index}: not a DALI webdataset index (header {header_line[:80]!r})")
    lines = body.splitlines()
    if len(lines) != int(header[1]):
        raise ValueError(f"{index}: header says {header[1]} samples, found {len(lines)}")
    if not lines:
        return [], {}
    first = lines[0].split()
    exts, width, tokens = first[0::4], len(first), body.split()
    if (not first or width % 4 or len(tokens) != len(lines) * width
            or any(tokens[4 * i :: width].count(ext) != len(lines) for i, ext in enumerate(exts))):
        for line_number, line in enumerate(lines, start=2):
            fields = line.split()
            if not fields or len(fields) % 4 or fields[0::4] != exts:
                raise ValueError(f"{index}:{line_number}: expected groups of 'ext offset size name', the members of "
                                 f"line 2 ({' '.join(exts)})")
    cut = len(exts[0]) + 1
    names = [name[:-cut] for name in tokens[3::width]]
    members = {ext: (list(map(int, tokens[4 * i + 1 :: width])), list(map(int, tokens[4 * i + 2 :: width])))
               for i, ext in enumerate(exts)}
    return names, members


def format_index(samples: list[tuple[str, dict[str, tuple[int, int]]]]) -> str:
    """The DALI webdataset index of samples given as (key, {ext: (offset, size)}), as `wds2idx` writes it for a tar;
    what tests and benchmarks fabricate large splits with, without writing tars."""
    lines = [f"v1.2 {len(samples)}"]
    lines += [" ".join(f"{ext} {offset} {size} {key}.{ext}" for ext, (offset, size) in members.items())
              for key, members in samples]
    return "\n".join(lines) + "\n"
