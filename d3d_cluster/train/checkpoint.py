"""Checkpoints of a stage: written by every rank under a unique tag, marked complete by the project's own marker
once every rank is done, checksummed, the last K kept; resumed from the newest one that verifies.

Layout: `STAGE/checkpoints/step-00000042/` holds DeepSpeed's files (module and optimizer states, ZeRO partitions
per rank), `rng-rank00000.pt` per rank, and `complete.json`, written last by rank 0 after a barrier: the step,
epoch, loader state, world size, ZeRO stage and the SHA-256 of every other file. DeepSpeed's own `latest` file is
not written: rank 0 writes it before the final barrier, so it can name a checkpoint another rank never finished.

A checkpoint saved by another number of ranks with ZeRO 1 or 2 cannot be loaded directly (the optimizer state is
partitioned by rank): it is converted once to DeepSpeed's universal format (`ds_to_universal`), which any world
size loads.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import random
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from d3d_cluster.collectives import barrier, from_rank0
from d3d_cluster.data.pipeline import LoaderState
from d3d_cluster.files import replace_atomically, write_json_atomically

CHECKPOINTS = "checkpoints"
MARKER = "complete.json"
UNIVERSAL = "universal"  # converted copies, under the checkpoints directory


def tag(step: int) -> str:
    return f"step-{step:08d}"


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int  # global micro-steps the world had run
    epoch: float  # epochs done, fractional
    loader: LoaderState
    world_size: int
    zero_stage: int
    files: dict[str, str]  # path relative to the checkpoint -> sha256

    @property
    def tag(self) -> str:
        return self.path.name

    @classmethod
    def read(cls, path: Path) -> "Checkpoint":
        record = json.loads((path / MARKER).read_text())
        return cls(path, record["step"], record["epoch"], LoaderState.from_dict(record["loader"]),
                   record["world_size"], record["zero_stage"], record["files"])

    def problem(self) -> str | None:
        """Why this checkpoint cannot be trusted (a missing, truncated or altered file), or None."""
        for name, digest in self.files.items():
            file = self.path / name
            if not file.is_file():
                return f"{file} is missing"
            if _sha256(file) != digest:
                return f"{file} does not match its checksum"
        return None


def completed(directory: Path) -> list[Checkpoint]:
    """The checkpoints of `directory` that every rank finished, oldest first (not yet verified)."""
    found = []
    for marker in Path(directory).glob(f"step-*/{MARKER}"):
        try:
            found.append(Checkpoint.read(marker.parent))
        except (OSError, ValueError, KeyError) as error:
            warnings.warn(f"{marker}: unreadable completion marker ({error}); ignoring that checkpoint")
    return sorted(found, key=lambda checkpoint: checkpoint.step)


def latest_valid(directory: Path) -> Checkpoint | None:
    """The newest complete checkpoint whose files match their checksums; each one passed over is warned about."""
    for checkpoint in reversed(completed(directory)):
        problem = checkpoint.problem()
        if problem is None:
            return checkpoint
        warnings.warn(f"checkpoint {checkpoint.path} is damaged ({problem}); falling back to an older one")
    return None


def save(engine, directory: Path, step: int, epoch: float, loader: LoaderState, keep: int) -> Checkpoint:
    """Every rank calls this at the same step (it is collective); all return the written checkpoint."""
    rank, world = dist.get_rank(), dist.get_world_size()
    path = Path(directory) / tag(step)
    if rank == 0 and path.exists():  # the remains of a save interrupted at this very step
        shutil.rmtree(path)
    barrier()
    engine.save_checkpoint(str(directory), tag=path.name, save_latest=False)
    replace_atomically(path / f"rng-rank{rank:05d}.pt", lambda tmp: torch.save(_rng_state(), tmp))
    barrier()
    checkpoint = Checkpoint(path, step, epoch, loader, world, engine.zero_optimization_stage(), {})
    if rank == 0:
        files = {str(f.relative_to(path)): _sha256(f) for f in sorted(path.rglob("*")) if f.is_file()}
        record = {"step": step, "epoch": epoch, "loader": loader.to_dict(), "world_size": world,
                  "zero_stage": checkpoint.zero_stage, "time": time.time(), "files": files}
        write_json_atomically(path / MARKER, record)
        _prune(Path(directory), keep)
    barrier()
    return checkpoint


def _prune(directory: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; drop older ones and any unfinished save older than them."""
    kept = completed(directory)[-keep:]
    if not kept:
        return
    oldest_kept = kept[0].step
    for path in [*directory.glob("step-*"), *(directory / UNIVERSAL).glob("step-*")]:
        if path.is_dir() and int(path.name.split("-")[1]) < oldest_kept:
            shutil.rmtree(path, ignore_errors=True)


def choose(directory: Path) -> Checkpoint | None:
    """The checkpoint every rank resumes from: rank 0 verifies, the others take its choice."""
    return from_rank0(latest_valid(directory) if dist.get_rank() == 0 else None)


def needs_universal(checkpoint: Checkpoint, world: int) -> bool:
    """ZeRO 1/2 partitions the optimizer state by rank: another world size needs the universal format."""
    return checkpoint.world_size != world and checkpoint.zero_stage > 0


def load(engine, checkpoint: Checkpoint) -> None:
    """Restore engine (module, optimizer, schedule, step counters) and this rank's RNG states.

    An engine built with `load_universal` reads the converted copy `universal_copy` made.
    """
    if engine.load_universal_checkpoint():
        load_path, _ = engine.load_checkpoint(str(checkpoint.path.parent / UNIVERSAL), tag=checkpoint.tag)
    else:
        load_path, _ = engine.load_checkpoint(str(checkpoint.path.parent), tag=checkpoint.tag)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {checkpoint.path}")
    rng = checkpoint.path / f"rng-rank{dist.get_rank():05d}.pt"
    if rng.is_file():  # a rank the checkpointed world did not have starts from its seeded state
        try:
            state = torch.load(rng, weights_only=True)
        except pickle.UnpicklingError:
            warnings.warn(f"{rng}: random state pickled by an older version, not loaded (that would run code "
                          f"from the file): this rank goes on from its seeded state")
        else:
            _set_rng_state(state)


def universal_copy(checkpoint: Checkpoint) -> Path:
    """Convert `checkpoint` to DeepSpeed's universal format once (rank 0; the others wait)."""
    target = checkpoint.path.parent / UNIVERSAL / checkpoint.tag
    if dist.get_rank() == 0 and not (target / MARKER).is_file():
        from deepspeed.checkpoint.ds_to_universal import main as to_universal

        if target.exists():
            shutil.rmtree(target)
        to_universal(_universal_arguments(checkpoint.path, target))
        write_json_atomically(target / MARKER, {"from": str(checkpoint.path), "time": time.time()})
    barrier()
    return target


def _universal_arguments(source: Path, target: Path):
    from argparse import Namespace

    return Namespace(input_folder=str(source), output_folder=str(target), num_extract_workers=1,
                     num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)


def _rng_state() -> dict:
    """This process's random states as tensors and plain numbers only, so that reading them back unpickles no
    code (`torch.load(weights_only=True)`)."""
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
             "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                        "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["position"], numpy["has_gauss"],
                         numpy["cached_gaussian"]))
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"].tolist()), python["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()

