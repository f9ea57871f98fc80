"""The shard schema: the one contract between `dataprep` (writer) and the DALI loader (reader).

A split is a set of WebDataset tars `<split>-NNNNNN.tar`, each with a DALI index `<split>-NNNNNN.idx`,
described by `manifest.json` at the root of the shard directory. Each sample holds:

- `rgb.webm`  : the RGB video, F frames, 8-bit 4:2:0 VP9 (decodable by DALI's CPU and NVDEC decoders).
- `flow.webm` : TV-L1 optical flow between consecutive RGB frames, F-1 frames. Each frame is gray and
                twice as wide as the RGB frame: the quantized x component on the left half, y on the right.
                Gray survives 4:2:0 chroma subsampling intact, and one video keeps both components in step.
- `cls`       : the class index, ASCII.
- `json`      : metadata (`key`, `label`, `source`, `frames`).

Since schema 3 the manifest also lists, per shard and in the shard's order, each sample's label and each member's
CRC-32 (`member_checksum`): the loader serves labels from memory, and a member whose bytes changed after prep is
refused on read (VP9 decoders conceal damage instead of failing). Shards of schema 2 still load, unchecked.

Flow i is the motion from RGB frame i to frame i+1, so a clip of RGB frames [s, s+T) pairs with flow
frames [s, s+T) and a clip may start anywhere in [0, F-1-T]. Videos keep their own length: the manifest lists
each sample's F per shard, in the shard's (and its index's) order, so clips are cut from the whole of each video.

Flow is quantized as I3D prepared it: clipped to [-bound, bound] pixels, mapped linearly onto [0, 255].
The loader maps it back to [-1, 1] with `q / 127.5 - 1`, so negating a component (horizontal flip) is exact.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from d3d_cluster.files import write_json_atomically

SCHEMA_VERSION = 3  # 2: per-sample frame counts (ShardInfo.frames); 3: labels and member checksums
UNCHECKED_VERSION = 2  # the oldest schema that loads: its shards carry no labels or member checksums
RGB_EXT = "rgb.webm"
FLOW_EXT = "flow.webm"
LABEL_EXT = "cls"
META_EXT = "json"
SAMPLE_EXTS = (RGB_EXT, FLOW_EXT, LABEL_EXT, META_EXT)
SPLITS = ("train", "val")
MANIFEST_NAME = "manifest.json"


def quantize_flow(flow: np.ndarray, bound: float) -> np.ndarray:
    """(..., 2) float pixels -> (..., 2) uint8, clipped to [-bound, bound]."""
    scaled = (np.clip(flow, -bound, bound) + bound) * (255.0 / (2.0 * bound))
    return np.rint(scaled).astype(np.uint8)


def dequantize_flow(quantized: np.ndarray, bound: float) -> np.ndarray:
    """Inverse of `quantize_flow`, back to float pixels (up to the quantization step)."""
    return quantized.astype(np.float32) * (2.0 * bound / 255.0) - bound


def flow_to_frame(quantized: np.ndarray) -> np.ndarray:
    """(H, W, 2) uint8 flow -> (H, 2W, 3) gray RGB frame with x on the left half and y on the right."""
    gray = np.concatenate([quantized[..., 0], quantized[..., 1]], axis=1)
    return np.repeat(gray[..., None], 3, axis=2)


def frame_to_flow(frame: np.ndarray) -> np.ndarray:
    """Inverse of `flow_to_frame` for (..., H, 2W, C) decoded frames -> (..., H, W, 2) uint8."""
    gray = frame[..., 0]
    width = gray.shape[-1] // 2
    return np.stack([gray[..., :width], gray[..., width:]], axis=-1)


@dataclass
class ShardInfo:
    path: str  # relative to the manifest's directory
    index: str
    samples: int
    sha256: str
    frames: list[int]  # RGB frames of each sample, in the shard's order
    labels: list[int] | None = None  # class index of each sample (None: schema 2)
    checksums: dict[str, list[int]] | None = None  # per member ext, each sample's `member_checksum` (None: schema 2)


@dataclass
class SplitInfo:
    shards: list[ShardInfo] = field(default_factory=list)
    samples: int = 0
    class_counts: dict[str, int] = field(default_factory=dict)


@dataclass
class Manifest:
    classes: list[str]
    min_frames: int  # RGB frames of the shortest sample (flow has one fewer): the longest clip every sample holds
    height: int
    width: int
    fps: float
    keyframe_interval: int
    flow: dict  # algorithm, bound and the algorithm's parameters, as used
    splits: dict[str, SplitInfo]
    rejects: int = 0
    schema_version: int = SCHEMA_VERSION

    @property
    def flow_bound(self) -> float:
        return float(self.flow["bound"])

    def save(self, directory: str | os.PathLike) -> Path:
        return write_json_atomically(Path(directory) / MANIFEST_NAME, asdict(self))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Manifest":
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no shard manifest (run `d3dc prep` first)")
        try:
            raw = json.loads(path.read_text())
            version = raw.get("schema_version")
            if version not in (UNCHECKED_VERSION, SCHEMA_VERSION):
                raise ValueError(f"schema_version {version!r}, expected {SCHEMA_VERSION}"
                                 + (" (shards from before per-sample frame counts: run `d3dc prep` again)"
                                    if version == 1 else ""))
            raw["splits"] = {
                name: SplitInfo(
                    shards=[ShardInfo(**shard) for shard in split["shards"]],
                    samples=split["samples"],
                    class_counts=split["class_counts"],
                )
                for name, split in raw["splits"].items()
            }
            for name, split in raw["splits"].items():
                for shard in split.shards:
                    _check_columns(name, shard)
            manifest = cls(**raw)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: malformed manifest: {error}") from error
        if version == UNCHECKED_VERSION:
            _warn_unchecked(path)
        return manifest

    def shard_paths(self, directory: str | os.PathLike, split: str) -> tuple[list[Path], list[Path]]:
        """Absolute tar and index paths of a split; a missing file is an error naming it."""
        if split not in self.splits:
            raise ValueError(f"{Path(directory) / MANIFEST_NAME}: no split {split!r} (has {sorted(self.splits)})")
        root = Path(directory)
        tars = [root / shard.path for shard in self.splits[split].shards]
        indexes = [root / shard.index for shard in self.splits[split].shards]
        missing = [str(p) for p in tars + indexes if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"missing shard files for split {split!r}: {', '.join(missing)}")
        return tars, indexes


def _check_columns(split: str, shard: ShardInfo) -> None:
    """Every per-sample list of a shard has one entry per sample."""
    columns = {"frame counts": shard.frames, "labels": shard.labels,
               **{f"{ext} checksums": values for ext, values in (shard.checksums or {}).items()}}
    for what, values in columns.items():
        if values is not None and len(values) != shard.samples:
            raise ValueError(f"split {split!r} shard {shard.path}: {shard.samples} samples but {len(values)} {what}")


_warned_unchecked: set[Path] = set()


def _warn_unchecked(path: Path) -> None:
    """Once per manifest and process: the loader, the evaluation and the precompute pass each load it."""
    if path.resolve() in _warned_unchecked:
        return
    _warned_unchecked.add(path.resolve())
    warnings.warn(f"{path}: shards of schema_version {UNCHECKED_VERSION} carry no member checksums: bytes damaged "
                  f"after prep go unnoticed, and labels are read from the shards; run `d3dc prep` again to add them",
                  stacklevel=3)


def member_checksum(data) -> int:
    """CRC-32 of a member's bytes: a few GB/s, and in the standard library."""
    return zlib.crc32(data)


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
