"""The frozen teacher's outputs for every clip the student trains on, computed once before the student trains
(`student.distill.precompute`).

A training clip's view is a pure function of (seed, epoch, sample) (`data.order.train_view`), so a flow-only
`ClipLoader` built with the student's seed, data settings and world hands the teacher exactly the clips the
live teacher would see. The student then decodes RGB only and reads the teacher's output of each clip by
(batch.epochs, batch.samples), ahead of its step on reader threads of its own (`TeacherOutputs.prefetch`): a page
fault on a network file system then stalls a reader, not the training step.

RUN/student/teacher_outputs/ holds
- manifest.json: the fingerprint the outputs were computed from (the teacher weights' sha256, seed, shard list
  hash, train sample keys, view settings, target, precision), the epochs complete, the samples whose flow could
  not be decoded with the epochs in which each has no row, and how long each epoch took;
- epoch-NNNN.npy: one row per train sample in `SampleTable` order: logits, or the target layer's maps
  (`stored_dtype`). A row the pass could not fill (a sample undecodable in that epoch) is NaN;
- epoch-NNNN.npy.partial: the epoch being computed.

Rank 0 creates an epoch's partial file at its full size (sparse where the file system allows); every rank computes
its share (the loader's own split of steps) and writes each batch's rows at their samples' places as the batch
comes, with positioned writes rather than a shared memory map: two ranks' rows may share a page, and a network file
system writes a dirty page of a map back whole, over the other node's rows. Rank 0 then checks, from the sample ids
the ranks computed, that each row was computed once or its sample skipped as unusable in that epoch, writes NaN
into the skipped rows, renames the file into place and only then adds the epoch to the manifest. No rank holds
more of an epoch than one batch of rows and the epoch's sample ids (`host_bytes_per_rank`). An interrupted pass
thus keeps its complete epochs, and a requeued student reuses every epoch that matches. A manifest with another
fingerprint is stale: it is replaced and its epochs computed again.

Unusable samples are recorded per epoch: damage may show in some views only (streams are cut to the clip), and a
rank's loader keeps skipping a sample it found corrupt while another rank may compute it in a later epoch. The
student leaves out a sample unusable in any epoch in every epoch (`TeacherOutputs.unusable`): its loader's skip
list is one set for the run, which keeps every rank's steps a function of the seed and that set, at any world size
and across resumes, as the live run's loader keeps skipping a sample once found corrupt; it costs a few samples'
other views.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from d3d_cluster.collectives import barrier, gather_to_rank0
from d3d_cluster.data.index import SampleTable
from d3d_cluster.data.pipeline import ClipLoader, pins, shard_list_hash, to_device
from d3d_cluster.data.schema import Manifest, sha256_of
from d3d_cluster.files import write_json_atomically
from d3d_cluster.models import S3DG, teacher_target
from d3d_cluster.spec import Spec
from d3d_cluster.train.engine import autocast, autocast_dtype

DIRECTORY_NAME = "teacher_outputs"
MANIFEST_NAME = "manifest.json"
FORMAT = 2  # 2: unusable samples recorded with the epochs in which they have no row
# Batches of targets read ahead and not yet taken, at most: the loader plans about 3 + 2 x data.pipelines batches
# ahead of the step, and a plan it drops (a corrupt sample found) is never taken.
PREFETCHED_BATCHES = 16
PREFETCH_THREADS = 2
# Host bytes a train sample costs a rank, at most: its key, held by every rank (the split's and the manifest's) and,
# on rank 0 completing an epoch, the ranks' gathered ids and the manifest read and written again (218 bytes a sample
# measured for that step alone, with Kinetics' 25-character keys).
SAMPLE_BYTES = 512
# sbatch --mem's units (a bare number is MiB).
MEMORY_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def stored_dtype(target: str) -> type:
    """Logits as float32; feature maps as float16 (half the bytes; their rounding error, about 1e-3 relative, is
    far below what the student learns to match)."""
    return np.float32 if target == "logits" else np.float16


class StaleTeacherOutputs(ValueError):
    """Stored outputs computed from something else than what the student now trains with."""


def epoch_path(directory: Path, epoch: int) -> Path:
    return directory / f"epoch-{epoch:04d}.npy"


def _partial_path(directory: Path, epoch: int) -> Path:
    return directory / f"epoch-{epoch:04d}.npy.partial"


def fingerprint(spec: Spec, teacher_weights: Path, keys: list[str], shard_hash: str, device: torch.device) -> dict:
    """Everything a stored output depends on: the same fingerprint means the same teacher on the same clips."""
    data, target = spec.data, spec.student.distill.target
    precision = autocast_dtype(device) or torch.float32
    return {
        "format": FORMAT,
        "teacher_sha256": sha256_of(teacher_weights),
        "target": target,
        "dtype": np.dtype(stored_dtype(target)).name,
        "precision": str(precision).removeprefix("torch."),
        "seed": spec.seed,
        "shards": shard_hash,
        "views": {"clip_frames": data.clip_frames, "frame_stride": data.frame_stride, "crop_size": data.crop_size,
                  "crop_area": data.crop_area, "crop_aspect": data.crop_aspect, "mirror": data.mirror},
        "keys": keys,
    }


def output_shape(spec: Spec, num_classes: int) -> tuple[int, ...]:
    """One clip's stored output: its logits, or its map at the target layer (worked out on the meta device: no
    compute)."""
    if spec.student.distill.target == "logits":
        return (num_classes,)
    return _map_shape(num_classes, spec.model.width, spec.model.gating, spec.data.clip_frames, spec.data.crop_size,
                      spec.student.distill.target)


@functools.lru_cache
def _map_shape(num_classes: int, width: float, gating: bool, frames: int, side: int, layer: str) -> tuple[int, ...]:
    """Built on the meta device, leaving the random state alone (the student's weights are drawn from it next), and
    kept: a full-size network's pass, even there, takes seconds on a CPU."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        teacher = S3DG(num_classes, in_channels=2, width=width, gating=gating).eval()  # as the pass runs it
        return tuple(teacher_target(teacher, torch.empty(1, 2, frames, side, side), layer).shape[1:])


def host_bytes_per_rank(spec: Spec, shape: tuple[int, ...], train_samples: int) -> int:
    """Host memory one rank holds for the teacher outputs (of `shape` a clip), at most: in the pass, a batch of the
    teacher's outputs (as float32, then in the stored dtype) and the split's sample keys and ids; in training, the
    batches of targets read ahead. The epochs themselves are only ever on disk."""
    elements = int(np.prod(shape))
    row = elements * np.dtype(stored_dtype(spec.student.distill.target)).itemsize
    batch = spec.data.batch_size
    return batch * (elements * 4 + row) + train_samples * SAMPLE_BYTES + PREFETCHED_BATCHES * batch * row


def _node_memory(spec: Spec) -> tuple[int, str] | None:
    """The memory of a node the stage runs on, and where that figure comes from: this machine's for the local
    executor (which ignores cluster.mem), else cluster.mem; None where it is not known here (Slurm's default)."""
    mem = spec.cluster.mem
    if spec.cluster.executor == "local":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's memory (executor local)"
    if mem is not None:
        number, unit = (mem[:-1], mem[-1]) if mem[-1] in MEMORY_UNITS else (mem, "M")
        return int(number) * MEMORY_UNITS[unit], f"cluster.mem = {mem}"
    return None


def check_space(spec: Spec, num_classes: int, train_samples: int) -> None:
    """Refuse, before the student is queued, teacher outputs the run directory's file system cannot hold, or whose
    reading and writing would outgrow a node's memory."""
    target, shape = spec.student.distill.target, output_shape(spec, num_classes)
    row = int(np.prod(shape)) * np.dtype(stored_dtype(target)).itemsize
    node = _node_memory(spec)
    per_rank = host_bytes_per_rank(spec, shape, train_samples)
    ranks = spec.cluster.tasks_per_node
    if node is not None and ranks * per_rank > node[0]:
        raise ValueError(f"student.distill.precompute: each of cluster.tasks_per_node = {ranks} ranks holds up to "
                         f"{per_rank / 2**20:.1f} MiB of teacher outputs (data.batch_size = {spec.data.batch_size} "
                         f"clips of {row} bytes ({target}), {PREFETCHED_BATCHES} batches read ahead, "
                         f"{train_samples} sample keys), {ranks * per_rank / 2**30:.2f} GiB a node, over "
                         f"{node[1]} ({node[0] / 2**30:.2f} GiB); lower data.batch_size, give the nodes more memory, "
                         f"or train with the live teacher")
    directory = spec.run_dir / "student" / DIRECTORY_NAME
    needed = row * train_samples * spec.student.epochs  # an epoch under way is written in place, in its partial file
    present = sum(path.stat().st_blocks * 512 for path in directory.glob("epoch-*")) if directory.is_dir() else 0
    existing = next(path for path in (directory, *directory.parents) if path.exists())
    free = shutil.disk_usage(existing).free
    if needed - present > free:
        raise ValueError(f"student.distill.precompute: the teacher outputs of {train_samples} clips x "
                         f"{spec.student.epochs} epochs ({target}, {row} bytes a clip) need "
                         f"{needed / 2**30:.1f} GiB, and {existing} has {free / 2**30:.1f} GiB free; "
                         f"free space, or train with the live teacher")


def _differences(stored: dict, expected: dict) -> list[str]:
    return [name for name in expected if stored.get(name) != expected[name]]


def _read_manifest(directory: Path) -> dict | None:
    path = directory / MANIFEST_NAME
    return json.loads(path.read_text()) if path.is_file() else None


class TeacherOutputs:
    """The stored outputs of a complete pass, read by (epochs, samples); refused when stale or incomplete."""

    def __init__(self, directory: Path, expected: dict, epochs: int):
        manifest = _read_manifest(directory)
        if manifest is None:
            raise FileNotFoundError(f"{directory / MANIFEST_NAME}: no precomputed teacher outputs")
        differing = _differences(manifest["fingerprint"], expected)
        if differing:
            raise StaleTeacherOutputs(f"{directory}: the teacher outputs were computed for another "
                                      f"{', '.join(differing)}; they must be computed again")
        missing = sorted(set(range(epochs)) - set(manifest["epochs"]))
        if missing:
            raise ValueError(f"{directory}: teacher outputs of epochs {missing} have not been computed")
        self.directory, self.keys = directory, expected["keys"]
        self.shape = tuple(manifest["shape"])  # of one clip's output
        self.unusable = sorted(record["sample"] for record in manifest["unusable"])  # in some epoch: left out in all
        self._epochs: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()  # over the open epochs and the reads under way, shared with the reader threads
        self._prefetched: OrderedDict[tuple, Future] = OrderedDict()
        self._readers: ThreadPoolExecutor | None = None

    @property
    def channels(self) -> int:
        return self.shape[0]

    def prefetch(self, epochs, samples, device: torch.device = torch.device("cpu")) -> Future:
        """Start reading these clips' outputs on this object's reader threads; `targets` of the same clips takes
        the result instead of reading. Call it as soon as a batch is planned, from any thread: it does not wait.
        The Future gives the rows on the host (pinned for a GPU `device`). At most `PREFETCHED_BATCHES` reads wait
        to be taken: the oldest is dropped for a new one (its batch, if it comes, is read then)."""
        epochs, samples = np.asarray(epochs, dtype=np.int64).copy(), np.asarray(samples, dtype=np.int64).copy()
        key = _clips_key(epochs, samples, pins(device))
        with self._lock:
            if key not in self._prefetched:
                if self._readers is None:
                    self._readers = ThreadPoolExecutor(PREFETCH_THREADS, thread_name_prefix="teacher-outputs")
                self._prefetched[key] = self._readers.submit(self._rows, epochs, samples, pins(device))
                while len(self._prefetched) > PREFETCHED_BATCHES:
                    self._prefetched.popitem(last=False)[1].cancel()
            return self._prefetched[key]

    def targets(self, epochs: torch.Tensor, samples: torch.Tensor,
                device: torch.device = torch.device("cpu")) -> torch.Tensor:
        """The teacher's outputs for these clips (clip i: sample `samples[i]`'s view of epoch `epochs[i]`; a training
        step may span two epochs), in the stored dtype, on `device`: taken from `prefetch` where it read them, else
        read here; copied from pinned memory without making the host wait when `device` is a GPU."""
        epochs, samples = np.asarray(epochs, dtype=np.int64), np.asarray(samples, dtype=np.int64)
        with self._lock:
            prefetched = self._prefetched.pop(_clips_key(epochs, samples, pins(device)), None)
        rows = prefetched.result() if prefetched is not None else self._rows(epochs, samples, pins(device))
        return to_device(rows, device)

    def _epoch(self, epoch: int) -> np.ndarray:
        with self._lock:
            if epoch not in self._epochs:
                self._epochs[epoch] = np.load(epoch_path(self.directory, epoch), mmap_mode="r")
            return self._epochs[epoch]

    def _rows(self, epochs: np.ndarray, samples: np.ndarray, pin: bool) -> torch.Tensor:
        stored = {epoch: self._epoch(epoch) for epoch in np.unique(epochs).tolist()}
        first = stored[int(epochs[0])]
        rows = torch.empty((len(samples), *first.shape[1:]), dtype=torch.from_numpy(np.empty(0, first.dtype)).dtype,
                           pin_memory=pin)
        for epoch, table in stored.items():
            of_epoch = epochs == epoch
            rows.numpy()[of_epoch] = np.take(table, samples[of_epoch], axis=0)
        empty = np.isnan(rows.numpy().reshape(len(rows), -1)).any(axis=1)
        if empty.any():
            missing = [f"{self.keys[s]} (epoch {e})" for s, e in zip(samples[empty].tolist(), epochs[empty].tolist())]
            raise ValueError(f"{self.directory}: no teacher output for samples {missing}")
        return rows


def _clips_key(epochs: np.ndarray, samples: np.ndarray, pinned: bool) -> tuple:
    return epochs.tobytes(), samples.tobytes(), pinned


def precompute_teacher_outputs(spec: Spec, teacher: S3DG, teacher_weights: Path, directory: Path, rank: int,
                               world: int, device_id: int | None) -> TeacherOutputs:
    """Every rank computes its share of the epochs the stored outputs lack; all ranks must call it."""
    device = torch.device("cpu") if device_id is None else torch.device("cuda", device_id)
    shards, epochs = spec.path(spec.data.shards), spec.student.epochs
    manifest = Manifest.load(shards)
    table = SampleTable.of_split(manifest, shards, "train")
    keys = list(table.keys)
    table.close()
    expected = fingerprint(spec, teacher_weights, keys, shard_list_hash(manifest, "train"), device)
    if rank == 0:
        _start(directory, expected)
    barrier()
    stored = _read_manifest(directory)
    done = set(stored["epochs"])
    todo = [epoch for epoch in range(epochs) if epoch not in done]
    if rank == 0 and done:
        print(f"[student] reusing the teacher outputs of epochs {sorted(done)} in {directory}", flush=True)
    if todo:
        loader = ClipLoader(shards, "train", spec.data, modalities=("flow",), rank=rank, world=world, seed=spec.seed,
                            train=True, whole_epochs=True, device_id=device_id, first_epoch=todo[0],
                            epochs=epochs - todo[0],
                            skip=[record["sample"] for record in stored["unusable"]])
        target, shape = spec.student.distill.target, output_shape(spec, len(manifest.classes))
        for epoch in range(todo[0], epochs):
            started = time.perf_counter()
            if rank == 0:
                _create_epoch(directory, epoch, (len(keys), *shape), stored_dtype(target))
            barrier()
            with _RowWriter(_partial_path(directory, epoch)) as rows:
                for batch in loader.epoch(epoch):
                    with torch.no_grad(), autocast(device):
                        flow = batch.flow.to(device)
                        output = teacher_target(teacher, flow, target)
                    samples = batch.samples.numpy()
                    rows.write(samples, _stored_rows(output, target, samples, keys, epoch))
            reports = gather_to_rank0({"samples": rows.samples(), "skipped": list(loader.skipped)})
            if rank == 0:
                _complete(directory, epoch, reports, time.perf_counter() - started)
            barrier()
        loader.close()
    return TeacherOutputs(directory, expected, epochs)


def _create_epoch(directory: Path, epoch: int, shape: tuple[int, ...], dtype: type) -> None:
    """Rank 0: the epoch's partial file, a header and a size (sparse where the file system allows: no row is written
    here), for every rank to write its rows into."""
    np.lib.format.open_memmap(_partial_path(directory, epoch), "w+", dtype, shape)


def _stored_rows(output: torch.Tensor, target: str, samples: np.ndarray, keys: list[str], epoch: int) -> np.ndarray:
    """A batch's outputs as stored; a NaN output is refused, since a NaN row reads as a sample without one."""
    rows = output.float().cpu().numpy().astype(stored_dtype(target))
    empty = np.isnan(rows.reshape(len(rows), -1)).any(axis=1)
    if empty.any():
        raise ValueError(f"the teacher's {target} output is NaN for samples {_named(keys, samples[empty])} of "
                         f"epoch {epoch}")
    return rows


def _named(keys: list[str], samples) -> str:
    names = [keys[sample] for sample in list(samples)[:10]]
    return f"{names}" + (f" and {len(samples) - 10} more" if len(samples) > 10 else "")


class _RowWriter:
    """Rows of one epoch written into its partial file at their samples' places, with positioned writes (two
    ranks' rows may share a page: a shared map would write it back whole from each node); flushed to disk on a
    clean exit, before rank 0 renames the file."""

    def __init__(self, path: Path):
        layout = np.load(path, mmap_mode="r")  # only its header is read: where rows start, their shape and dtype
        self.path, self.offset, self.row_shape, self.dtype = path, layout.offset, layout.shape[1:], layout.dtype
        self.row_bytes = int(np.prod(self.row_shape)) * self.dtype.itemsize
        del layout
        self._written: list[np.ndarray] = []
        self._fd = os.open(path, os.O_WRONLY)

    def __enter__(self) -> "_RowWriter":
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        try:
            if error_type is None:
                os.fsync(self._fd)
        finally:
            os.close(self._fd)

    def write(self, samples: np.ndarray, rows: np.ndarray) -> None:
        if rows.shape[1:] != self.row_shape or rows.dtype != self.dtype:
            raise ValueError(f"{self.path}: rows of shape {rows.shape[1:]} ({rows.dtype}) given, the file holds "
                             f"{self.row_shape} ({self.dtype})")
        for sample, row in zip(samples.tolist(), np.ascontiguousarray(rows)):
            data, at = memoryview(row).cast("B"), self.offset + sample * self.row_bytes
            while data:
                written = os.pwrite(self._fd, data, at)
                data, at = data[written:], at + written
        self._written.append(np.array(samples, dtype=np.int64))

    def samples(self) -> np.ndarray:
        """The samples whose rows were written, in order."""
        return np.concatenate(self._written) if self._written else np.empty(0, np.int64)


def _start(directory: Path, expected: dict) -> None:
    """Keep a matching manifest; replace a stale or absent one with an empty one, then drop the old files."""
    directory.mkdir(parents=True, exist_ok=True)
    stored = _read_manifest(directory)
    if stored is not None and not _differences(stored["fingerprint"], expected):
        return
    if stored is not None:
        print(f"[student] the teacher outputs in {directory} were computed for another "
              f"{', '.join(_differences(stored['fingerprint'], expected))}: computing them again", flush=True)
    write_json_atomically(directory / MANIFEST_NAME, {"fingerprint": expected, "shape": None, "epochs": [],
                                                      "unusable": [], "seconds": {}})
    for old in directory.glob("epoch-*"):
        old.unlink()


def _complete(directory: Path, epoch: int, reports: list[dict], seconds: float) -> None:
    """Rank 0, once every rank has written its rows of `epoch` (`reports`: each rank's samples computed and corrupt
    samples found): each row must have been computed once or its sample be unusable; the rows of samples skipped in
    this epoch become NaN and are recorded so, then the file is renamed into place and the epoch added to the
    manifest. It holds the epoch's sample ids, never its rows."""
    partial = _partial_path(directory, epoch)
    manifest = _read_manifest(directory)
    keys = manifest["fingerprint"]["keys"]
    counts = np.bincount(np.concatenate([report["samples"] for report in reports]), minlength=len(keys))
    twice = np.flatnonzero(counts > 1)
    if len(twice):
        raise RuntimeError(f"{partial}: samples {_named(keys, twice)} were computed by more than one rank")
    unusable = {record["sample"]: record for record in manifest["unusable"]}
    known = {record["key"] for record in unusable.values()}
    found = {record["key"]: record for report in reports for record in report["skipped"] if record["key"] not in known}
    for key, record in found.items():
        unusable[keys.index(key)] = {"sample": keys.index(key), **record, "epochs": []}
    skipped = np.flatnonzero(counts == 0)
    unexplained = [sample for sample in skipped.tolist() if sample not in unusable]
    computed = len(keys) - len(skipped)
    if unexplained:
        raise RuntimeError(f"{partial}: {computed} rows computed and {len(skipped) - len(unexplained)} samples "
                           f"skipped as unusable in epoch {epoch}, but the split has {len(keys)}: no rank computed "
                           f"{_named(keys, unexplained)}")
    with _RowWriter(partial) as rows:
        empty = np.full((1, *rows.row_shape), np.nan, rows.dtype)
        for sample in skipped.tolist():
            rows.write(np.array([sample]), empty)
            unusable[sample]["epochs"].append(epoch)
    os.replace(partial, epoch_path(directory, epoch))
    manifest.update(shape=list(rows.row_shape), epochs=sorted(set(manifest["epochs"]) | {epoch}),
                    unusable=sorted(unusable.values(), key=lambda record: record["sample"]))
    manifest["seconds"][str(epoch)] = seconds
    write_json_atomically(directory / MANIFEST_NAME, manifest)
    print(f"[student] teacher outputs of epoch {epoch} computed in {seconds:.1f} s: {computed} clips, "
          f"{len(keys) * rows.row_bytes / 2**20:.1f} MiB", flush=True)
