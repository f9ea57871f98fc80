import os
import random
import resource
import tarfile
import threading
import time
from collections import Counter

from d3d_cluster.data import index
from d3d_cluster.data.index import MAX_OPEN, SampleTable
from d3d_cluster.data.schema import Manifest


def _table(shards, copies: int = 1, **kwargs) -> SampleTable:
    """The train split, its shards listed `copies` times over: each copy is a shard of its own to the table."""
    manifest = Manifest.load(shards)
    tars, indexes = manifest.shard_paths(shards, "train")
    frames = [shard.frames for shard in manifest.splits["train"].shards]
    return SampleTable(tars * copies, indexes * copies, frames * copies, **kwargs)


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
