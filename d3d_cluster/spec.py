"""The job spec: one typed tree loaded from YAML, validated once, frozen, and passed down by sections.

Every error names the file, the dotted key and what was expected, and is raised before anything runs
or is queued. The defaults are the quickstart (`Spec()` is what `d3dc quickstart` runs; `jobs/quickstart.yaml`
writes it out for copying). Relative paths are relative to `workdir`, which is itself relative to the current directory.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Any, Literal, Optional
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class SpecError(ValueError):
    """A spec that cannot run; the message names the file and the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SyntheticSpec(_Section):
    """The motion dataset `dataprep.synthetic` makes: classes differ only by how things move."""

    kind: Literal["shapes", "dots"] = Field(
        "shapes", description="shapes: textured objects that move, turn or zoom (the quickstart's; every class "
                              "keeps its label under a mirror); dots: random dots drifting in one of 8 compass "
                              "directions, a second source to check tuned settings on (a mirror turns east into "
                              "west: train it with data.mirror false)")
    classes: int = Field(6, ge=2, le=8)
    videos_per_class: int = Field(80, ge=2)
    frames: int = Field(20, ge=4)
    size: int = Field(64, ge=32)
    val_fraction: float = Field(0.25, gt=0.0, lt=1.0, description="per class (the quickstart's 120 validation "
                                                                   "videos make one video 0.8 points)")


class FlowSpec(_Section):
    algorithm: Literal["tvl1", "farneback"] = "tvl1"
    bound: float = Field(20.0, gt=0.0, description="pixels; flow is clipped to [-bound, bound] (I3D)")
    scales: int = Field(3, ge=1, description="TV-L1 pyramid levels (OpenCV's default is 5)")
    warps: int = Field(3, ge=1, description="TV-L1 warpings per level (OpenCV's default is 5)")


class PrepSpec(_Section):
    """Raw videos to shards. Paths are relative to the workdir; each source reads only the fields it names."""

    source: Literal["synthetic", "csv", "ucf101", "hmdb51", "kinetics"] = "synthetic"
    labels: str = Field("raw/labels.csv", description="synthetic, csv: CSV of path,label[,split] (synthetic writes it)")
    root: str = Field("raw", description="ucf101, hmdb51: the folder of class folders; kinetics: the folder holding the clips")
    annotations: str = Field(
        "annotations",
        description="ucf101: classInd.txt, trainlist0N.txt, testlist0N.txt; hmdb51: <class>_test_splitN.txt; "
        "kinetics: train.csv and validate.csv (or val.csv)",
    )
    split_number: int = Field(1, ge=1, le=3, description="ucf101, hmdb51: which of the three official splits")
    synthetic: SyntheticSpec = SyntheticSpec()
    # I3D and S3D-G resized every video so that its short side is 256 and cropped 224x224 at training time;
    # the shard schema holds one frame size, so datasets of mixed aspect ratios (Kinetics, HMDB-51) need
    # frame_size: each video is scaled to cover it, aspect kept, and centre-cropped to it.
    frame_size: list[int] | None = Field(
        None, description="[height, width]: scale to cover, then centre-crop; null: resize the short side only"
    )
    short_side: int = Field(64, ge=16, description="without frame_size: frames are resized so that their short side is this")
    loop_short: bool = Field(False, description="loop videos shorter than a clip to its length, as I3D did, instead of rejecting them")
    fps: float = Field(25.0, gt=0.0)
    keyframe_interval: int = Field(8, ge=1, le=16, description="short, so random temporal crops decode little")
    crf: int = Field(10, ge=0, le=63, description="VP9 quality of RGB (lower is better)")
    flow_crf: int = Field(0, ge=0, le=63, description="VP9 quality of flow: near-lossless keeps it within +-1 level")
    flow: FlowSpec = FlowSpec()
    shard_samples: int = Field(32, ge=1)
    workers: int = Field(2, ge=1)
    seed: int = 0

    @field_validator("frame_size")
    @classmethod
    def _even_pair(cls, size: list[int] | None) -> list[int] | None:
        if size is not None and (len(size) != 2 or any(side < 16 or side % 2 for side in size)):
            raise ValueError("must be [height, width], both even and at least 16 (VP9 4:2:0)")
        return size

    @property
    def min_side(self) -> int:
        """The smallest side of every stored frame: what a crop must fit in."""
        return min(self.frame_size) if self.frame_size else self.short_side


class DataSpec(_Section):
    shards: str = "shards"
    clip_frames: int = Field(16, ge=1)
    frame_stride: int = Field(1, ge=1, description="temporal stride: a clip spans (clip_frames - 1) x stride + 1 frames")
    crop_size: int = Field(56, ge=8)
    crop_area: Optional[list[float]] = Field(
        None, description="random resized crop: [min, max] fraction of the frame's area; null: a plain random "
                          "crop_size crop (S3D-G)")
    crop_aspect: list[float] = Field([0.75, 1.3333], description="[min, max] aspect ratio of resized crops")
    # BatchNorm statistics are per rank: with 8 clips per rank the RGB student of the quickstart did not
    # learn at all (top-1 at chance), with 16 it did; there is no SyncBatchNorm on CPU (gloo).
    batch_size: int = Field(16, ge=1, description="clips per rank per micro-step (BatchNorm sees this many)")
    reader_threads: int = Field(1, ge=1, description="DALI threads of each of a rank's pipelines")
    pipelines: int = Field(1, ge=1, description="DALI pipelines per rank, delivering its batches in turn: each decodes "
                                                "on a CUDA stream of its own (the mixed decoder waits on its stream "
                                                "after every frame); the batches are the same whatever their number")
    decoder: Literal["auto", "gpu", "cpu"] = Field(
        "auto", description="DALI's video decoder on a GPU rank. gpu: NVDEC (DALI's mixed decoder), which decodes no "
                            "VP9 frame smaller than 128x128; cpu: DALI's CPU decoder, the clips then go to the GPU; "
                            "auto: NVDEC where the stored frames allow it, else the CPU decoder. A CPU rank always "
                            "decodes on the CPU")
    eval_clips: int = Field(1, ge=1, description="temporal clips per validation video; softmax scores averaged")
    eval_crops: Literal[1, 3] = Field(1, description="spatial crops per validation clip: centre, or 3 along the long side")
    mirror: bool = Field(True, description="mirror half the training clips; false where a mirror turns one class into "
                                           "another (Something-Something's 'left to right')")
    mirror_pairs: list[list[str]] = Field([], description="pairs of classes a mirror turns into each other: a mirrored "
                                                          "clip of one is labelled as the other")

    @field_validator("mirror_pairs")
    @classmethod
    def _pairs(cls, pairs: list[list[str]]) -> list[list[str]]:
        seen = set()
        for pair in pairs:
            if len(pair) != 2 or pair[0] == pair[1]:
                raise ValueError(f"each pair must name two different classes, got {pair}")
            if seen & set(pair):
                raise ValueError(f"class {sorted(seen & set(pair))[0]!r} is in more than one pair")
            seen.update(pair)
        return pairs

    @model_validator(mode="after")
    def _pairs_need_mirroring(self) -> "DataSpec":
        if self.mirror_pairs and not self.mirror:
            raise ValueError("mirror_pairs is set but mirror is false: the pairs would never be swapped")
        return self

    @field_validator("crop_area", "crop_aspect")
    @classmethod
    def _range(cls, value: Optional[list[float]], info) -> Optional[list[float]]:
        if value is None:
            return value
        ceiling = 1.0 if info.field_name == "crop_area" else float("inf")
        if len(value) != 2 or not 0 < value[0] <= value[1] <= ceiling:
            bound = "1" if ceiling == 1.0 else "inf"
            raise ValueError(f"must be [min, max] with 0 < min <= max <= {bound}")
        return value

    @property
    def clip_span(self) -> int:
        """Video frames a clip covers, plus the one its last flow frame looks ahead to."""
        return (self.clip_frames - 1) * self.frame_stride + 2


class ModelSpec(_Section):
    width: float = Field(0.25, gt=0.0, le=2.0)
    gating: bool = True
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    compile: bool = Field(False, description="torch.compile the trained network (slow to start; for long GPU runs)")
    precision: Literal["auto", "fp32"] = Field(
        "auto", description="auto: bf16 autocast on a GPU (fp32 weights, BatchNorm statistics, gradients and "
                            "optimizer), fp32 on a CPU; fp32: fp32 on every device, TF32 convolutions off too: "
                            "the reference bf16 is checked against")


class OptimizerSpec(_Section):
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(3e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD only")
    warmup_epochs: float = Field(1.0, ge=0.0)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    decay_epochs: list[float] = Field([], description="step only: epochs at which the rate is multiplied by decay_factor")
    decay_factor: float = Field(0.1, gt=0.0, le=1.0, description="step only")

    @model_validator(mode="after")
    def _decay_points(self) -> "OptimizerSpec":
        if self.schedule == "step" and not self.decay_epochs:
            raise ValueError("schedule step needs decay_epochs, e.g. [10, 20]")
        if self.decay_epochs != sorted(self.decay_epochs) or any(e <= 0 for e in self.decay_epochs):
            raise ValueError(f"decay_epochs must be positive and increasing (got {self.decay_epochs})")
        return self


# S3D-G layers a student can be distilled at and the motion probe can read
FEATURE_LAYERS = ("conv_1a", "conv_2b", "conv_2c", "mixed_3b", "mixed_3c", "mixed_4b", "mixed_4c", "mixed_4d",
                  "mixed_4e", "mixed_4f", "mixed_5b", "mixed_5c")


class DistillSpec(_Section):
    """What the student matches of the frozen teacher, and how (D3D, Stroud et al. 2020, section 4).

    The defaults are the quickstart's: the teacher's conv_2c map at lambda 100, which beat the paper's loss (logits,
    lambda 1), other layers and other lambdas at that scale (BENCHMARKS.md, "D3D's claim in miniature"). The
    dataset specs under jobs/ keep the paper's loss."""

    weight: float = Field(100.0, ge=0.0, description="lambda: weight of the distillation term next to cross-entropy")
    target: Literal[("logits", *FEATURE_LAYERS)] = Field(
        "conv_2c", description="logits (the paper's), or a layer's feature map (conv_2c, mixed_5c, ...) through a "
                               "trained 1x1x1 projection")
    loss: Literal["mse", "kl"] = Field("mse", description="squared error, or Hinton's KL on logits x temperature^2")
    temperature: float = Field(1.0, gt=0.0, description="kl only: softmax temperature of both networks")
    precompute: bool = Field(
        False, description="run the teacher once over every (epoch, clip) before training and store its outputs in "
                           "RUN/student/teacher_outputs (logits as float32, feature maps as float16); the student "
                           "then decodes RGB only")

    @model_validator(mode="after")
    def _kl_on_logits(self) -> "DistillSpec":
        if self.loss == "kl" and self.target != "logits":
            raise ValueError(f"loss kl compares class distributions: it needs target logits, not {self.target}")
        return self


class InitSpec(_Section):
    """Initial weights of the trained network, from a file (never downloaded); none: random initialisation."""

    path: str | None = Field(None, description="relative to workdir; checked (and loaded once) before a stage is queued")
    format: Literal["s3dg", "torchvision_s3d", "inception_v1_2d"] = Field(
        "s3dg", description="s3dg: this project's state dict, loaded strictly; torchvision_s3d: torchvision's S3D "
                            "(Kinetics-400; needs model.width 1.0, exact with model.gating false); inception_v1_2d: "
                            "an ImageNet GoogLeNet state dict inflated to 3D (needs model.width 1.0); see "
                            "d3d_cluster/models/weights.py")
    head: Literal["load", "reinit"] = Field(
        "load", description="s3dg: load the file's classifier too (same classes), or reinit: load everything but "
                            "the classifier, which starts fresh (fine-tuning on another label set)")


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
    max_nonfinite_steps: int = Field(3, ge=1, description="consecutive NaN or infinite losses skipped before the "
                                                           "stage stops with an error (its last checkpoint kept)")


class CheckpointSpec(_Section):
    """Checkpoints of a stage: periodic, and whenever the job is told to stop (time limit, preemption)."""

    every_steps: int = Field(50, ge=1, description="micro-steps between periodic checkpoints")
    keep: int = Field(3, ge=1, description="complete checkpoints kept; older ones are deleted")


SBATCH_OPTION = re.compile(r"[a-z][a-z0-9-]*")
# sbatch options a job of ours is given from elsewhere: not to be set again through cluster.sbatch_options
# (a test renders our batch scripts and checks that every option they carry is listed here).
SBATCH_OPTIONS_SET_HERE = {
    **{name.replace("_", "-"): f"by cluster.{name}" for name in (
        "nodes", "cpus_per_task", "partition", "account", "qos", "constraint", "gpus_per_node", "mem", "exclusive")},
    "ntasks-per-node": "by cluster.tasks_per_node", "time": "by cluster.timeout_min",
    "signal": "by cluster.signal_delay_s", "job-name": "by d3dc (the spec's name and the job)",
    **dict.fromkeys(("output", "error", "open-mode", "requeue", "dependency", "kill-on-invalid-dep", "array", "wrap",
                     "wckey"), "by d3dc and submitit (logs, requeue and job chains depend on it)"),
}


class ClusterSpec(_Section):
    """Where and how big a stage runs: nodes x tasks_per_node ranks. The Slurm settings left at None are not
    passed to sbatch, so the cluster's own defaults apply; the local executor ignores them."""

    executor: Literal["auto", "local", "slurm"] = Field(
        "auto", description="auto: Slurm where its commands are installed and its controller answers, else local "
                            "(submitit's AutoExecutor convention); resolved when a job is submitted")
    nodes: int = Field(1, ge=1)
    tasks_per_node: int = Field(2, ge=1, description="ranks per node: one per GPU, or CPU processes")
    cpus_per_task: int = Field(1, ge=1)
    timeout_min: int = Field(60, ge=1)
    # Names as Slurm spells them (a partition may be a comma-separated list): nothing that a batch script's
    # #SBATCH line or shell would read as more than a value.
    partition: str | None = Field(None, pattern=r"^[A-Za-z0-9_.+-]+(,[A-Za-z0-9_.+-]+)*$")
    account: str | None = Field(None, pattern=r"^[A-Za-z0-9_.+-]+$")
    qos: str | None = Field(None, pattern=r"^[A-Za-z0-9_.+-]+$")
    constraint: str | None = Field(None, pattern=r"^[A-Za-z0-9_.,&|:*!\[\]()+-]+$",
                                   description="node features, as sbatch --constraint takes them")
    gpus_per_node: int | None = Field(None, ge=1, description="equal to tasks_per_node: one rank per GPU")
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="cuda: every rank needs a GPU, a node without one fails the job at once; cpu: no GPU is "
                            "used; auto: a GPU where one is visible, and required when gpus_per_node is set")
    mem: str | None = Field(None, pattern=r"^[0-9]+[KMGT]?$", description="memory per node, as sbatch --mem (32G)")
    exclusive: bool = Field(False, description="whole nodes, shared with no other job")
    signal_delay_s: int = Field(90, ge=1, description="USR2 this long before the time limit, to checkpoint in")
    # Preemptions are not the job's fault and never use up a budget (submitit counts them apart too).
    max_time_limit_requeues: int = Field(20, ge=0, description="requeues after reaching the time limit: a run needs "
                                                                "one per time limit it outlives")
    max_crash_requeues: int = Field(3, ge=0, description="requeues after a death without warning (a killed rank, an "
                                                         "out-of-memory kill, a node Slurm requeued the job from)")
    collective_timeout_s: int = Field(1800, ge=1, description="how long a rank waits in a collective (NCCL, gloo) for "
                                                             "a peer that stopped answering before it fails, so that "
                                                             "the job ends and is requeued instead of hanging")
    sbatch_options: dict[str, str | int | bool] = Field(
        {}, description="more sbatch options as `--KEY=VALUE` (mail-type: END, reservation: maint, gres: gpu:a100:8); "
                        "true: a flag; the options this section sets have keys of their own")
    setup: list[str] = Field([], description="shell lines the batch script runs before the ranks start (module load "
                                             "cuda/12.4, export NCCL_SOCKET_IFNAME=ib0)")

    @field_validator("sbatch_options")
    @classmethod
    def _sbatch_options(cls, options: dict) -> dict:
        for key, value in options.items():
            if not SBATCH_OPTION.fullmatch(key):
                raise ValueError(f"{key!r} is not an sbatch option name (lowercase, as --mail-type is written)")
            if key in SBATCH_OPTIONS_SET_HERE:
                raise ValueError(f"{key} is set {SBATCH_OPTIONS_SET_HERE[key]}")
            if value is False or (isinstance(value, str) and (not value or any(c.isspace() for c in value))):
                raise ValueError(f"{key}: {value!r}: a value without spaces (sbatch reads an #SBATCH line up to "
                                 f"its first space), or true for a flag")
        return options

    @property
    def wants_gpu(self) -> bool:
        """Whether a rank without a GPU is an error rather than a CPU rank."""
        return self.device == "cuda" or (self.device == "auto" and self.gpus_per_node is not None)


class ProbeSpec(_Section):
    """The motion probe (`d3dc probe`): decoders trained on frozen features to predict the clip's optical flow."""

    layers: list[Literal[FEATURE_LAYERS]] = Field(["conv_2c", "mixed_3c", "mixed_4f", "mixed_5c"], min_length=1)
    epochs: int = Field(48, ge=1, description="decoder training epochs over the train split (fewer left the "
                                               "upper layers' decoders barely ahead of zero flow on the teacher)")
    lr: float = Field(1e-2, gt=0.0)
    hidden: int = Field(32, ge=1, description="channels of each decoder's hidden layer")
    views: int | None = Field(2, ge=1, description="augmented views of the train split that go through the frozen "
                                                   "network once, their features kept in memory for the decoders "
                                                   "to cycle over; null: a fresh view every epoch, nothing kept, "
                                                   "for features that do not fit in memory")

    @model_validator(mode="after")
    def _views_within_epochs(self) -> "ProbeSpec":
        if self.views is not None and self.views > self.epochs:
            raise ValueError(f"probe.views ({self.views}) exceeds probe.epochs ({self.epochs}): a view is a "
                             "decoder epoch's data, so the extra views would never be trained on")
        return self


class MetricsSpec(_Section):
    bind: str | None = Field(None, description="address each rank's endpoint binds; null: all interfaces "
                                               "with the slurm executor, loopback with the local one")
    port: int = Field(0, ge=0, le=65535, description="0: a free port per rank; else this + local rank, "
                                                     "or a free port when that one is taken")
    targets_dir: str | None = Field(None, description="file_sd directory shared by runs; null: RUN/metrics/targets")
    pushgateway: str | None = Field(None, description="Pushgateway URL for short dataprep tasks; null: no push")
    report_every_steps: int = Field(
        10, ge=1, description="steps whose loss, accuracy and gradient norm stay on the device before the host reads "
                              "them back, all in one transfer: the metrics, rank 0's train log (one record per step) "
                              "and the printed progress are updated then (and at least every 30 s), and before every "
                              "checkpoint; 1 reads every step, which on a GPU makes the host wait for each step to "
                              "finish")

    @field_validator("bind")
    @classmethod
    def _ip_address(cls, bind: str | None) -> str | None:
        if bind is not None:
            try:
                ipaddress.ip_address(bind)
            except ValueError:
                raise ValueError("must be an IP address (0.0.0.0 for all interfaces, 127.0.0.1) or null") from None
        return bind

    @field_validator("pushgateway")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is not None:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("must be an http(s) URL such as http://gateway:9091, or null")
        return url


class Spec(_Section):
    # A study's points are runs inside the study's directory: NAME/seed-0/student.distill.weight-10.
    name: str = Field("quickstart", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)*$")
    workdir: str = "d3dc-work"
    seed: int = 0
    prep: PrepSpec = PrepSpec()
    data: DataSpec = DataSpec()
    model: ModelSpec = ModelSpec()
    teacher: StageSpec = StageSpec()
    student: StudentSpec = StudentSpec()
    deepspeed: DeepSpeedSpec = DeepSpeedSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    cluster: ClusterSpec = ClusterSpec()
    metrics: MetricsSpec = MetricsSpec()
    probe: ProbeSpec = ProbeSpec()

    @model_validator(mode="before")
    @classmethod
    def _no_control_characters(cls, tree):
        """Strings reach batch scripts and shell lines (names, paths, Slurm settings): a newline there would start
        a line of its own, so no string of a spec may hold a control character."""
        def walk(value, key: str) -> None:
            if isinstance(value, str) and any(ord(c) < 32 or ord(c) == 127 for c in value):
                raise ValueError(f"{key}: {value!r} holds a control character (a newline, a tab...), which a batch "
                                 f"script or shell line would read as more than a value")
            if isinstance(value, dict):
                for name, item in value.items():
                    walk(item, f"{key}.{name}" if key else str(name))
            if isinstance(value, (list, tuple)):
                for index, item in enumerate(value):
                    walk(item, f"{key}.{index}")

        walk(tree, "")
        return tree

    @model_validator(mode="after")
    def _consistent(self) -> "Spec":
        cluster = self.cluster
        if cluster.executor == "local" and cluster.nodes != 1:
            raise ValueError(f"cluster.nodes is {cluster.nodes}: the local executor runs on one node; queue it on "
                             f"Slurm with --cluster slurm (cluster.executor: slurm)")
        if cluster.gpus_per_node is not None and cluster.device == "cpu":
            raise ValueError(f"cluster.gpus_per_node ({cluster.gpus_per_node}) asks Slurm for GPUs that "
                             "cluster.device cpu would leave idle: drop one of them")
        if cluster.gpus_per_node is not None and cluster.gpus_per_node != cluster.tasks_per_node:
            raise ValueError(f"cluster.gpus_per_node ({cluster.gpus_per_node}) must equal cluster.tasks_per_node "
                             f"({cluster.tasks_per_node}): one rank per GPU")
        if cluster.signal_delay_s >= cluster.timeout_min * 60:
            raise ValueError(f"cluster.signal_delay_s ({cluster.signal_delay_s}) must be shorter than "
                             f"cluster.timeout_min ({cluster.timeout_min} min)")
        world = self.cluster.nodes * self.cluster.tasks_per_node
        micro = self.data.batch_size * world
        if self.deepspeed.global_batch_size % micro:
            raise ValueError(_batch_advice(self.deepspeed.global_batch_size, self.data.batch_size, world))
        if self.data.crop_size > self.prep.min_side:
            where = "prep.frame_size" if self.prep.frame_size else "prep.short_side"
            raise ValueError(f"data.crop_size ({self.data.crop_size}) exceeds {where} ({self.prep.min_side})")
        if self.prep.source == "synthetic" and self.data.clip_span > self.prep.synthetic.frames:
            raise ValueError(
                f"data.clip_frames ({self.data.clip_frames}) with data.frame_stride ({self.data.frame_stride}) "
                f"needs {self.data.clip_span} video frames (flow is between frame pairs); "
                f"prep.synthetic.frames is {self.prep.synthetic.frames}"
            )
        if (self.prep.source == "synthetic" and self.prep.synthetic.kind == "dots" and self.data.mirror
                and not self.data.mirror_pairs):
            raise ValueError("prep.synthetic.kind dots: its classes are directions, and a mirrored clip of east shows "
                             "west; set data.mirror: false (or name the mirrored pairs in data.mirror_pairs)")
        for stage in ("teacher", "student"):
            init = getattr(self, stage).init
            if init.format != "s3dg" and init.path and self.model.width != 1.0:
                raise ValueError(f"{stage}.init.format {init.format} needs model.width 1.0 (got {self.model.width}): "
                                 f"the checkpoint has Inception-v1's channel counts")
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
        return parse_spec(assign(self.model_dump(), dotted), source="overrides")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(), sort_keys=False)


def _batch_advice(global_batch: int, per_rank: int, world: int) -> str:
    """Why a global batch does not fit the world, and the two ways to make it fit, with numbers."""
    micro = per_rank * world
    lines = [f"deepspeed.global_batch_size ({global_batch}) must be a multiple of data.batch_size x world size "
             f"({per_rank} x {world} = {micro}). The global batch stays as the spec says whatever the world size "
             f"(gradient accumulation makes up the rest), so the learning rates stay right; to fit {world} ranks:"]
    below, above = global_batch // micro * micro, (global_batch // micro + 1) * micro
    sizes = [size for size in (below, above) if size >= micro]
    scale = " or ".join(f"--set deepspeed.global_batch_size={size} (learning rates x {size / global_batch:g}, the "
                        f"linear scaling rule)" for size in sizes)
    lines.append(f"- a global batch that {world} ranks share: {scale}")
    fitting = [size for size in range(per_rank - 1, 0, -1) if global_batch % (size * world) == 0]
    if fitting:
        lines.append(f"- or fewer clips per rank: --set data.batch_size={fitting[0]} "
                     f"(BatchNorm then sees {fitting[0]} clips a rank)")
    return "\n".join(lines)


def assign(tree: dict, dotted: dict[str, Any]) -> dict:
    """`tree` with each dotted key (`student.distill.weight`) set, sections made where the tree lacks them; the
    result is validated by the caller, which names an unknown key and what was expected."""
    for key, value in dotted.items():
        *parents, leaf = key.split(".")
        node, path = tree, []
        for part in parents:
            path.append(part)
            if node.get(part) is None:
                node[part] = {}
            elif not isinstance(node[part], dict):
                raise SpecError(f"{key}: {'.'.join(path)} is a value ({node[part]!r}), not a section")
            node = node[part]
        node[leaf] = value
    return tree


def parse_assignment(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` from the command line; the value is read as YAML (`0.5`, `false`, `[0.3, 1.0]`, `null`), as the
    same value in a spec file would be."""
    key, equals, value = text.partition("=")
    if not equals or not key or not all(key.split(".")):
        raise SpecError(f"--set {text!r}: expected KEY=VALUE with a dotted spec key (student.distill.weight=0.5)")
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError as error:
        raise SpecError(f"--set {key}: value {value!r} is not valid YAML: {error}") from None


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


def load_spec(path: str | os.PathLike | None, overrides: dict[str, Any] | None = None) -> Spec:
    """The spec in a file (None: the embedded quickstart default) with dotted-key `overrides` applied to what the
    file says before anything is validated, so an override can also repair a value the file gets wrong."""
    source = str(path) if path is not None else "the embedded default spec"
    tree: Any = {}
    if path is not None:
        try:
            tree = yaml.safe_load(Path(path).read_text())
        except OSError as error:
            raise SpecError(f"{path}: cannot read spec: {error.strerror}") from None
        except yaml.YAMLError as error:
            raise SpecError(f"{path}: not valid YAML: {error}") from None
    if overrides:
        if tree is None:
            tree = {}
        if isinstance(tree, dict):
            tree = assign(tree, overrides)
        source += f" with {', '.join(overrides)} from the command line"
    return parse_spec(tree, source=source)
