"""The frozen teacher's outputs for every clip the student trains on, computed once before the student trains
(`student.distill.precompute`).

A training clip's view is a pure function of (seed, epoch, sample) (`data.order.train_view`), so a flow-only
`ClipLoader` built with the student's seed, data settings and world hands the teacher exactly the clips the
live teacher would see. The student then decodes RGB only and reads the teacher's output of each clip by
(batch.epochs, batch.samples).

RUN/student/teacher_outputs/ holds
- manifest.json: the fingerprint the outputs were computed from (the teacher weights' sha256, seed, shard list
  hash, train sample keys, view settings, target, precision), the epochs complete, the samples whose flow could
  not be decoded, and how long each epoch took;
- epoch-NNNN.npy: one row per train sample in `SampleTable` order: logits, or the target layer's maps
  (`stored_dtype`). A row the pass could not fill (an undecodable sample) is NaN.

Each rank computes its share of every epoch (the loader's own split of steps) and writes it to a part file;
rank 0 merges the parts into the epoch file and only then adds the epoch to the manifest. An interrupted pass
thus keeps its complete epochs, and a requeued student reuses every epoch that matches. A manifest with another
fingerprint is stale: it is replaced and its epochs computed again.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from d3d_cluster.collectives import barrier
from d3d_cluster.data.index import SampleTable
from d3d_cluster.data.pipeline import ClipLoader, pins, shard_list_hash, to_device
from d3d_cluster.data.schema import Manifest, sha256_of
from d3d_cluster.files import replace_atomically, write_json_atomically
from d3d_cluster.models import S3DG, teacher_target
from d3d_cluster.spec import Spec
from d3d_cluster.train.engine import autocast, autocast_dtype

DIRECTORY_NAME = "teacher_outputs"
MANIFEST_NAME = "manifest.json"
FORMAT = 1


def stored_dtype(target: str) -> type:
    """Logits as float32; feature maps as float16 (half the bytes; their rounding error, about 1e-3 relative, is
    far below what the student learns to match)."""
    return np.float32 if target == "logits" else np.float16


class StaleTeacherOutputs(ValueError):
    """Stored outputs computed from something else than what the student now trains with."""


def epoch_path(directory: Path, epoch: int) -> Path:
    return directory / f"epoch-{epoch:04d}.npy"


def _part_path(directory: Path, epoch: int, rank: int) -> Path:
    return directory / f"epoch-{epoch:04d}.rank-{rank:05d}.npz"


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
    teacher = S3DG(num_classes, in_channels=2, width=spec.model.width, gating=spec.model.gating).to("meta")
    clip = torch.empty(1, 2, spec.data.clip_frames, spec.data.crop_size, spec.data.crop_size, device="meta")
    return tuple(teacher_target(teacher, clip, spec.student.distill.target).shape[1:])


def check_space(spec: Spec, num_classes: int, train_samples: int) -> None:
    """Refuse, before the student is queued, teacher outputs the run directory's file system cannot hold."""
    directory = spec.run_dir / "student" / DIRECTORY_NAME
    row = int(np.prod(output_shape(spec, num_classes))) * np.dtype(stored_dtype(spec.student.distill.target)).itemsize
    # One epoch more: its parts lie beside the epoch files while rank 0 merges them.
    needed = row * train_samples * (spec.student.epochs + 1)
    present = sum(path.stat().st_size for path in directory.glob("epoch-*")) if directory.is_dir() else 0
    existing = next(path for path in (directory, *directory.parents) if path.exists())
    free = shutil.disk_usage(existing).free
    if needed - present > free:
        raise ValueError(f"student.distill.precompute: the teacher outputs of {train_samples} clips x "
                         f"{spec.student.epochs} epochs ({spec.student.distill.target}, {row} bytes a clip) need "
                         f"{needed / 2**30:.1f} GiB, and {existing} has {free / 2**30:.1f} GiB free; "
                         f"free space, or train with the live teacher")


def _differences(stored: dict, expected: dict) -> list[str]:
    return [name for name in expected if stored.get(name) != expected[name]]


def _read_manifest(directory: Path) -> dict | None:
    path = directory / MANIFEST_NAME
    return json.loads(path.read_text()) if path.is_file() else None


class TeacherOutputs:
    """The stored outputs of a complete pass, read by (epoch, samples); refused when stale or incomplete."""

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
        self.unusable = sorted(record["sample"] for record in manifest["unusable"])
        self._epochs: dict[int, np.ndarray] = {}

    @property
    def channels(self) -> int:
        return self.shape[0]

    def targets(self, epochs: torch.Tensor, samples: torch.Tensor,
                device: torch.device = torch.device("cpu")) -> torch.Tensor:
        """The teacher's outputs for these clips (clip i: sample `samples[i]`'s view of epoch `epochs[i]`; a training
        step may span two epochs), in the stored dtype, on `device`: read into pinned memory and copied without making
        the host wait when that is a GPU."""
        wanted = epochs.numpy()
        for epoch in np.unique(wanted).tolist():
            if epoch not in self._epochs:
                self._epochs[epoch] = np.load(epoch_path(self.directory, epoch), mmap_mode="r")
        first = self._epochs[int(wanted[0])]
        rows = torch.empty((len(samples), *first.shape[1:]), dtype=torch.from_numpy(np.empty(0, first.dtype)).dtype,
                           pin_memory=pins(device))
        for epoch in np.unique(wanted).tolist():
            of_epoch = wanted == epoch
            rows.numpy()[of_epoch] = np.take(self._epochs[epoch], samples.numpy()[of_epoch], axis=0)
        empty = np.isnan(rows.numpy().reshape(len(rows), -1)).any(axis=1)
        if empty.any():
            missing = [f"{self.keys[s]} (epoch {e})" for s, e in zip(samples.numpy()[empty].tolist(),
                                                                      wanted[empty].tolist())]
            raise ValueError(f"{self.directory}: no teacher output for samples {missing}")
        return to_device(rows, device)


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
        target = spec.student.distill.target
        for epoch in range(todo[0], epochs):
            started = time.perf_counter()
            samples, outputs = [], []
            for batch in loader.epoch(epoch):
                with torch.no_grad(), autocast(device):
                    flow = batch.flow.to(device)
                    output = teacher_target(teacher, flow, target)
                outputs.append(output.float().cpu().numpy().astype(stored_dtype(target)))
                samples.append(batch.samples.numpy())
            part = {"samples": np.concatenate(samples), "outputs": np.concatenate(outputs),
                    "skipped": np.array(json.dumps(loader.skipped))}
            replace_atomically(_part_path(directory, epoch, rank), lambda tmp: _save(tmp, np.savez, **part))
            barrier()
            if rank == 0:
                _merge(directory, epoch, world, len(keys), time.perf_counter() - started)
            barrier()
        loader.close()
    return TeacherOutputs(directory, expected, epochs)


def _save(path: Path, save, *args, **arrays) -> None:
    with open(path, "wb") as handle:  # numpy appends a suffix to a bare path
        save(handle, *args, **arrays)


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


def _merge(directory: Path, epoch: int, world: int, rows: int, seconds: float) -> None:
    """Rank 0: the ranks' parts of one epoch into its file, then the epoch into the manifest."""
    parts = [_part_path(directory, epoch, rank) for rank in range(world)]
    loaded = [np.load(path) for path in parts]
    first = loaded[0]["outputs"]
    table = np.full((rows,) + first.shape[1:], np.nan, dtype=first.dtype)
    manifest = _read_manifest(directory)
    unusable = {record["sample"]: record for record in manifest["unusable"]}
    keys = manifest["fingerprint"]["keys"]
    for part in loaded:
        table[part["samples"]] = part["outputs"]
        for record in json.loads(str(part["skipped"])):
            unusable[keys.index(record["key"])] = {"sample": keys.index(record["key"]), **record}
    filled = int((~np.isnan(table.reshape(rows, -1)).any(axis=1)).sum())
    if filled + len(unusable) != rows:
        raise RuntimeError(f"{epoch_path(directory, epoch)}: {filled} rows computed and {len(unusable)} unusable "
                           f"samples, but the split has {rows}")
    replace_atomically(epoch_path(directory, epoch), lambda tmp: _save(tmp, np.save, table))
    manifest.update(shape=list(first.shape[1:]), epochs=sorted(set(manifest["epochs"]) | {epoch}),
                    unusable=sorted(unusable.values(), key=lambda record: record["sample"]))
    manifest["seconds"][str(epoch)] = seconds
    write_json_atomically(directory / MANIFEST_NAME, manifest)
    for path in parts:
        path.unlink()
    print(f"[student] teacher outputs of epoch {epoch} computed in {seconds:.1f} s: {filled} clips, "
          f"{table.nbytes / 2**20:.1f} MiB", flush=True)
