"""The job spec: one typed tree loaded from YAML, validated once, frozen, and passed down by sections.

Every error names the file, the dotted key and what was expected, and is raised before anything runs
or is queued. The defaults are the quickstart (`Spec()` is what `d3dc quickstart` runs; `jobs/quickstart.yaml`
writes it out for copying). Relative paths are relative to `workdir`, which is itself relative to the current directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class SpecError(ValueError):
    """A spec that cannot run; the message names the file and the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SyntheticSpec(_Section):
    """The motion dataset `dataprep.synthetic` makes: classes differ only by how a textured object moves."""

    classes: int = Field(6, ge=2, le=8)
    videos_per_class: int = Field(60, ge=2)
    frames: int = Field(20, ge=4)
    size: int = Field(64, ge=32)
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)


class FlowSpec(_Section):
    algorithm: Literal["tvl1", "farneback"] = "tvl1"
    bound: float = Field(20.0, gt=0.0, description="pixels; flow is clipped to [-bound, bound] (I3D)")
    scales: int = Field(3, ge=1, description="TV-L1 pyramid levels (OpenCV's default is 5)")
    warps: int = Field(3, ge=1, description="TV-L1 warpings per level (OpenCV's default is 5)")


class PrepSpec(_Section):
    source: Literal["synthetic", "csv"] = "synthetic"
    labels: str = Field("raw/labels.csv", description="CSV of path,label,split (made by the synthetic source)")
    synthetic: SyntheticSpec = SyntheticSpec()
    short_side: int = Field(64, ge=16, description="frames are resized so that their short side is this")
    fps: float = Field(25.0, gt=0.0)
    keyframe_interval: int = Field(8, ge=1, le=16, description="short, so random temporal crops decode little")
    crf: int = Field(10, ge=0, le=63, description="VP9 quality of RGB (lower is better)")
    flow_crf: int = Field(0, ge=0, le=63, description="VP9 quality of flow: near-lossless keeps it within +-1 level")
    flow: FlowSpec = FlowSpec()
    shard_samples: int = Field(32, ge=1)
    workers: int = Field(2, ge=1)
    seed: int = 0


class DataSpec(_Section):
    shards: str = "shards"
    clip_frames: int = Field(16, ge=1)
    crop_size: int = Field(56, ge=8)
    # BatchNorm statistics are per rank: with 8 clips per rank the RGB student of the quickstart did not
    # learn at all (top-1 at chance), with 16 it did; there is no SyncBatchNorm on CPU (gloo).
    batch_size: int = Field(16, ge=1, description="clips per rank per micro-step (BatchNorm sees this many)")
    reader_threads: int = Field(1, ge=1)


class ModelSpec(_Section):
    width: float = Field(0.25, gt=0.0, le=2.0)
    gating: bool = True
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    compile: bool = Field(False, description="torch.compile the trained network (slow to start; for long GPU runs)")


class OptimizerSpec(_Section):
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(3e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD only")
    warmup_epochs: float = Field(1.0, ge=0.0)
    schedule: Literal["cosine", "constant"] = "cosine"


class DistillSpec(_Section):
    """What the student matches of the frozen teacher, and how (D3D, Stroud et al. 2020, section 4)."""

    weight: float = Field(1.0, ge=0.0, description="lambda: weight of the distillation term next to cross-entropy")
    target: Literal["logits", "mixed_5c"] = Field(
        "logits", description="logits, or the Mixed_5c feature map through a trained 1x1x1 projection")
    loss: Literal["mse", "kl"] = Field("mse", description="squared error, or Hinton's KL on logits x temperature^2")
    temperature: float = Field(1.0, gt=0.0, description="kl only: softmax temperature of both networks")

    @model_validator(mode="after")
    def _kl_on_logits(self) -> "DistillSpec":
        if self.loss == "kl" and self.target != "logits":
            raise ValueError(f"loss kl compares class distributions: it needs target logits, not {self.target}")
        return self


class InitSpec(_Section):
    """Initial weights of the trained network, from a file (never downloaded); none: random initialisation."""

    path: str | None = Field(None, description="relative to workdir; checked (and loaded once) before a stage is queued")
    format: Literal["s3dg", "inception_v1_2d"] = Field(
        "s3dg", description="s3dg: this project's state dict, loaded strictly; inception_v1_2d: an ImageNet GoogLeNet "
                            "state dict inflated to 3D (needs model.width 1.0), see d3d_cluster/models/weights.py")


class StageSpec(_Section):
    epochs: int = Field(16, ge=1)
    optimizer: OptimizerSpec = OptimizerSpec()
    init: InitSpec = InitSpec()


class StudentSpec(StageSpec):
    epochs: int = Field(20, ge=1, description="RGB learns motion more slowly than flow shows it")
    # At lr 3e-3 after a 1-epoch warmup the RGB network often collapsed to constant logits.
    optimizer: OptimizerSpec = OptimizerSpec(lr=1e-3, warmup_epochs=2.0)
    distill: DistillSpec = DistillSpec()


class DeepSpeedSpec(_Section):
    zero_stage: Literal[0, 1, 2] = 1
    global_batch_size: int = Field(32, ge=1, description="kept fixed when the world size changes")
    gradient_clipping: float = Field(1.0, ge=0.0)


class ClusterSpec(_Section):
    executor: Literal["local", "slurm"] = "local"
    nodes: int = Field(1, ge=1)
    tasks_per_node: int = Field(2, ge=1, description="ranks per node: one per GPU, or CPU processes")
    cpus_per_task: int = Field(1, ge=1)
    timeout_min: int = Field(60, ge=1)


PROBE_LAYERS = ("conv_1a", "conv_2b", "conv_2c", "mixed_3b", "mixed_3c", "mixed_4b", "mixed_4c", "mixed_4d",
                "mixed_4e", "mixed_4f", "mixed_5b", "mixed_5c")


class ProbeSpec(_Section):
    """The motion probe (`d3dc probe`): decoders trained on frozen features to predict the clip's optical flow."""

    layers: list[Literal[PROBE_LAYERS]] = Field(["conv_2c", "mixed_3c", "mixed_4f", "mixed_5c"], min_length=1)
    epochs: int = Field(4, ge=1)
    lr: float = Field(3e-3, gt=0.0)
    hidden: int = Field(32, ge=1, description="channels of each decoder's hidden layer")


class MetricsSpec(_Section):
    bind: str = Field("127.0.0.1", description="address each rank's Prometheus endpoint binds")
    port: int = Field(0, ge=0, le=65535, description="first port; 0 picks a free port per rank")


class Spec(_Section):
    name: str = Field("quickstart", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    workdir: str = "d3dc-work"
    seed: int = 0
    prep: PrepSpec = PrepSpec()
    data: DataSpec = DataSpec()
    model: ModelSpec = ModelSpec()
    teacher: StageSpec = StageSpec()
    student: StudentSpec = StudentSpec()
    deepspeed: DeepSpeedSpec = DeepSpeedSpec()
    cluster: ClusterSpec = ClusterSpec()
    metrics: MetricsSpec = MetricsSpec()
    probe: ProbeSpec = ProbeSpec()

    @model_validator(mode="after")
    def _consistent(self) -> "Spec":
        world = self.cluster.nodes * self.cluster.tasks_per_node
        micro = self.data.batch_size * world
        if self.deepspeed.global_batch_size % micro:
            raise ValueError(
                f"deepspeed.global_batch_size ({self.deepspeed.global_batch_size}) must be a multiple of "
                f"data.batch_size x world size ({self.data.batch_size} x {world} = {micro})"
            )
        if self.data.crop_size > self.prep.short_side:
            raise ValueError(f"data.crop_size ({self.data.crop_size}) exceeds prep.short_side ({self.prep.short_side})")
        if self.prep.source == "synthetic" and self.data.clip_frames > self.prep.synthetic.frames - 1:
            raise ValueError(
                f"data.clip_frames ({self.data.clip_frames}) needs at least clip_frames + 1 video frames "
                f"(prep.synthetic.frames is {self.prep.synthetic.frames}): flow is between frame pairs"
            )
        for stage in ("teacher", "student"):
            if getattr(self, stage).init.format == "inception_v1_2d" and getattr(self, stage).init.path \
                    and self.model.width != 1.0:
                raise ValueError(f"{stage}.init.format inception_v1_2d needs model.width 1.0 (got {self.model.width}): "
                                 f"the 2D checkpoint has Inception-v1's channel counts")
        return self

    @property
    def world_size(self) -> int:
        return self.cluster.nodes * self.cluster.tasks_per_node

    @property
    def grad_accumulation(self) -> int:
        return self.deepspeed.global_batch_size // (self.data.batch_size * self.world_size)

    def path(self, relative: str) -> Path:
        """A spec path made absolute against the workdir."""
        return (Path(self.workdir) / relative).resolve()

    @property
    def run_dir(self) -> Path:
        return self.path("runs") / self.name

    def with_overrides(self, **dotted: Any) -> "Spec":
        """A copy with dotted keys replaced (`{"cluster.nodes": 8}`), validated again."""
        tree = self.model_dump()
        for key, value in dotted.items():
            _assign(tree, key, value)
        return parse_spec(tree, source="overrides")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(), sort_keys=False)


def _assign(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node[part]
    node[leaf] = value


def _section_at(loc: tuple) -> type[BaseModel]:
    section: type[BaseModel] = Spec
    for part in loc:
        section = section.model_fields[part].annotation
    return section


def _format(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            expected = ", ".join(_section_at(item["loc"][:-1]).model_fields)
            lines.append(f"{source}: unknown key {key} (expected one of: {expected})")
        else:
            got = item.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"{source}: {key + ': ' if key else ''}{item['msg']}{shown}")
    return "\n".join(lines)


def parse_spec(tree: dict | None, source: str = "<spec>") -> Spec:
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise SpecError(f"{source}: a spec is a mapping of sections, got {type(tree).__name__}")
    try:
        return Spec.model_validate(tree)
    except ValidationError as error:
        raise SpecError(_format(error, source)) from None


def load_spec(path: str | os.PathLike) -> Spec:
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text())
    except OSError as error:
        raise SpecError(f"{path}: cannot read spec: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: not valid YAML: {error}") from None
    return parse_spec(tree, source=str(path))
