import json
import os
import random
import re
import resource
import shutil
import tarfile
import threading
import time
import tracemalloc
from collections import Counter

import numpy as np
import pytest
from conftest import TINY, tiny_spec

from d3d_cluster.data import index
from d3d_cluster.data.index import MAX_OPEN, CorruptMember, SampleTable, ShardReadError, format_index
from d3d_cluster.data.pipeline import ClipLoader
from d3d_cluster.data.schema import (FLOW_EXT, LABEL_EXT, MANIFEST_NAME, RGB_EXT, UNCHECKED_VERSION, Manifest)
from d3d_cluster.launch.prep import prepare_locally
from d3d_cluster.spec import DataSpec


def _table(shards, copies: int = 1, **kwargs) -> SampleTable:
    """The train split, its shards listed `copies` times over: each copy is a shard of its own to the table."""
    manifest = Manifest.load(shards)
    tars, indexes = manifest.shard_paths(shards, "train")
    shards = manifest.splits["train"].shards
    return SampleTable(tars * copies, indexes * copies, [shard.frames for shard in shards] * copies,
                       labels=[shard.labels for shard in shards] * copies,
                       checksums=[shard.checksums for shard in shards] * copies, **kwargs)


def _members(table: SampleTable) -> dict[tuple[int, str], bytes]:
    """Every member's bytes as tarfile reads them, by (sample, ext): the truth, independent of the index offsets."""
    stored = {}
    for tar in set(table.tars):
        with tarfile.open(tar) as archive:
            for info in archive.getmembers():
                stored[tar, info.name] = archive.extractfile(info).read()
    return {(s, ext): stored[table.tars[member.tar], f"{table.keys[s]}.{ext}"]
            for s in range(len(table)) for ext, member in table.members[s].items()}


def _open_shards(tars: set[str]) -> int:
    """The process's descriptors on these files."""
    links = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
        except FileNotFoundError:  # listdir's own descriptor, closed by now
            pass
    return sum(link in tars for link in links)


def test_a_split_with_more_shards_than_the_descriptor_bound_is_read_whole_never_holding_more_open(tiny_shards,
                                                                                                  monkeypatch):
    table = _table(tiny_shards, copies=25)
    expected, tars = _members(table), {os.path.realpath(tar) for tar in table.tars}
    assert len(table.tars) > MAX_OPEN
    pread, held = os.pread, []

    def counting(fd, size, offset):
        held.append(_open_shards(tars))
        return pread(fd, size, offset)

    monkeypatch.setattr(index.os, "pread", counting)
    # Round-robin over the shards: every read finds its shard evicted. The process may open the bound and a few more.
    round_robin = sorted(expected, key=lambda key: (table.members[key[0]][key[1]].offset,
                                                    table.members[key[0]][key[1]].tar))
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + MAX_OPEN + 8, limits[1]))
    try:
        read = {key: table.read(*key).tobytes() for key in round_robin}
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)
    assert read == expected
    assert max(held) == MAX_OPEN
    table.close()
    assert _open_shards(tars) == 0


def test_threads_reading_at_once_get_every_member_right_and_no_descriptor_is_closed_under_a_read(tiny_shards,
                                                                                                monkeypatch):
    table = _table(tiny_shards, max_open=1)
    expected = _members(table)
    pread, close, reading, lock, closed_under_a_read = os.pread, os.close, Counter(), threading.Lock(), []

    def slow_pread(fd, size, offset):  # a read long enough for the other threads to evict its shard meanwhile
        with lock:
            reading[fd] += 1
        try:
            time.sleep(0.002)
            return pread(fd, size, offset)
        finally:
            with lock:
                reading[fd] -= 1

    def watched_close(fd):
        with lock:
            if reading[fd]:
                closed_under_a_read.append(fd)
        close(fd)

    monkeypatch.setattr(index.os, "pread", slow_pread)
    monkeypatch.setattr(index.os, "close", watched_close)
    results, errors = [], []

    def reader(seed):
        keys = list(expected)
        random.Random(seed).shuffle(keys)
        try:
            results.append({key: table.read(*key).tobytes() for key in keys})
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    table.close()
    assert not errors and not closed_under_a_read
    assert results == [expected] * 4
    assert _open_shards({os.path.realpath(tar) for tar in table.tars}) == 0


def _copy(shards, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    return copy


def _overwrite(tar, offset: int, data: bytes) -> None:
    with open(tar, "r+b") as handle:  # same length, so every offset in the index still holds
        handle.seek(offset)
        handle.write(data)


@pytest.fixture(scope="module")
def long_flow_shards(tmp_path_factory):
    """Shards whose flow streams (about 20 KB, 64 px and 16 frames) take 4 KiB of damage in their middle and still
    decode: the VP9 decoder conceals it (the tiny set's 4 KB streams lose their container instead)."""
    synthetic = {"classes": 2, "videos_per_class": 3, "frames": 16, "size": 64, "val_fraction": 0.34}
    spec = tiny_spec(tmp_path_factory.mktemp("long-flow"), prep={**TINY["prep"], "synthetic": synthetic,
                                                                 "short_side": 64})
    prepare_locally(spec, progress=False)
    return spec.path(spec.data.shards)


def test_a_flow_stream_damaged_after_prep_is_skipped_and_named_and_every_other_sample_is_delivered(long_flow_shards,
                                                                                                    tmp_path):
    shards = _copy(long_flow_shards, tmp_path)
    table = SampleTable.of_split(Manifest.load(shards), shards, "train")
    victim = max(range(len(table)), key=lambda s: table.members[s][FLOW_EXT].size)
    member, key = table.members[victim][FLOW_EXT], table.keys[victim]
    tar = table.tars[member.tar]
    table.close()
    _overwrite(tar, member.offset + (member.size - 4096) // 2, np.random.default_rng(0).bytes(4096))
    loader = ClipLoader(shards, "train", DataSpec(clip_frames=8, crop_size=24, batch_size=2),
                        modalities=("rgb", "flow"), rank=0, world=1, seed=0, train=False)
    delivered = Counter(loader.table.keys[int(s)] for batch in loader.epoch(0) for s in batch.samples)
    loader.close()
    assert sorted(delivered) == sorted(k for k in loader.table.keys if k != key)
    assert set(delivered.values()) == {loader.views_per_video}
    assert [(record["key"], record["modality"]) for record in loader.skipped] == [(key, "flow")]
    assert f"{tar}: sample {key!r} member {FLOW_EXT}: CRC-32" in loader.skipped[0]["error"]


def test_a_changed_byte_is_a_corrupt_member_naming_shard_sample_and_member_not_a_shard_read_error(tiny_shards,
                                                                                                   tmp_path):
    shards = _copy(tiny_shards, tmp_path)
    table = SampleTable.of_split(Manifest.load(shards), shards, "train")
    member = table.members[2][FLOW_EXT]
    middle = member.offset + member.size // 2
    _overwrite(table.tars[member.tar], middle, bytes([table.read(2, FLOW_EXT)[member.size // 2] ^ 1]))
    with pytest.raises(CorruptMember, match=re.escape(f"{table.tars[member.tar]}: sample {table.keys[2]!r} member "
                                                      f"{FLOW_EXT}")) as raised:
        table.read(2, FLOW_EXT)
    assert not isinstance(raised.value, ShardReadError)
    assert table.read(2, RGB_EXT).size and table.read(3, FLOW_EXT).size  # the rest of the shard reads
    table.close()


def test_labels_are_served_from_memory_and_match_the_shards_cls_members(tiny_shards, monkeypatch):
    table = _table(tiny_shards)
    expected = [int(_members(table)[s, LABEL_EXT]) for s in range(len(table))]
    monkeypatch.setattr(index.os, "pread", lambda *args: pytest.fail("a label was read from a shard"))
    assert [table.label(s) for s in range(len(table))] == expected
    table.close()


def test_shards_of_schema_2_load_with_one_warning_unchecked_with_labels_read_from_the_shards(tiny_shards, tmp_path):
    shards = _copy(tiny_shards, tmp_path)
    raw = json.loads((shards / MANIFEST_NAME).read_text())
    for split in raw["splits"].values():
        for shard in split["shards"]:
            del shard["labels"], shard["checksums"]
    raw["schema_version"] = UNCHECKED_VERSION
    (shards / MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.warns(UserWarning, match="carry no member checksums") as warned:
        manifest = Manifest.load(shards)
        Manifest.load(shards)
    assert len(warned) == 1
    table, checked = SampleTable.of_split(manifest, shards, "train"), _table(tiny_shards)
    member = table.members[1][FLOW_EXT]
    _overwrite(table.tars[member.tar], member.offset, b"\xff")
    assert table.read(1, FLOW_EXT)[0] == 0xFF  # nothing to check it against
    assert [table.label(s) for s in range(len(table))] == [checked.label(s) for s in range(len(checked))]
    table.close()
    checked.close()


def test_a_fabricated_split_costs_about_a_hundred_bytes_a_sample(tmp_path):
    """Kinetics-700's 550k training samples must fit every rank's host memory many times over: a list of keys and a
    dict of members per sample cost about 1 KB a sample, the columns under 130 B."""
    exts, samples, per_shard = ("cls", FLOW_EXT, "json", RGB_EXT), 20_000, 32
    tars, indexes, frames, labels, checksums = [], [], [], [], []
    for shard, first in enumerate(range(0, samples, per_shard)):
        keys = [f"train_{first + i:06d}" for i in range(per_shard)]
        listed = [(key, {ext: (512 + 4096 * (4 * i + j), 3000) for j, ext in enumerate(exts)})
                  for i, key in enumerate(keys)]
        indexes.append(tmp_path / f"train-{shard:06d}.idx")
        indexes[-1].write_text(format_index(listed))
        tars.append(tmp_path / f"train-{shard:06d}.tar")
        frames.append([250] * per_shard)
        labels.append([shard % 700] * per_shard)
        checksums.append({ext: list(range(per_shard)) for ext in exts})
    tracemalloc.start()
    try:
        table = SampleTable(tars, indexes, frames, labels=labels, checksums=checksums)
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(table) == samples and table.keys[samples - 1] == f"train_{samples - 1:06d}"
    assert table.members[33] == {ext: index.Member(1, 512 + 4096 * (4 + j), 3000) for j, ext in enumerate(exts)}
    assert table.label(40) == 1 and table.frames[40] == 250
    assert held / samples < 130
