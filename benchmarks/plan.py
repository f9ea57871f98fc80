"""What D3D on Kinetics-400 costs on 8, 64 and 512 H100s, worked out on paper from the figures measured so far.

    .venv/bin/python -m benchmarks.plan

The job is `jobs/kinetics400.yaml` (epochs, clip geometry, batch, optimizer, checkpoint interval, cores a node).
Every measured figure is read from `benchmarks/results/` and printed with its file and key, so the plan follows
new GPU figures as soon as their files change; a results file or key that is missing stops the plan with a
message naming it. Figures derived from the code (parameters, teacher output shapes, checkpoint layout) are
computed here. The few figures nobody here has measured are `Assumptions`, each printed with its source.
Writes the plan as JSON to `--out` (benchmarks/results/plan_kinetics400.json).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import write_report
from d3d_cluster.models import S3DG, FeatureDistillation
from d3d_cluster.spec import FEATURE_LAYERS, Spec, load_spec
from d3d_cluster.train.teacher_outputs import stored_dtype

RESULTS = Path("benchmarks/results")
SPEC_PATH = Path("jobs/kinetics400.yaml")
GPU_COUNTS = (8, 64, 512)
STAGES = ("teacher", "student")
GB = 1e9
# Fp32 buffers a parameter has in a DeepSpeed ZeRO-1/2 checkpoint (`train.engine.deepspeed_config`: no bf16
# section): the module's weights, ZeRO's fp32 partition of them, and the optimizer's state. A real save of the
# full-width teacher (deepspeed 0.19.8, one CPU rank, 2026-12-07) took 12.03 bytes a parameter with SGD, 16.03 with
# AdamW.
OPTIMIZER_BUFFERS = {"sgd": 1, "adamw": 2}


@dataclass(frozen=True)
class Assumptions:
    """What no results file holds: the dataset's size, the interconnect, the file system and the stored bytes of a
    frame. Each has its source in `SOURCES`; change one here and the plan follows."""

    train_videos: int = 240_000
    validation_videos: int = 20_000
    video_seconds: float = 10.0
    classes: int = 400
    nvlink_bus_gb_s: float = 360.0
    nvlink_step_latency_us: float = 5.0
    nic_bus_gb_s: float = 40.0
    nics_per_node: int = 8
    infiniband_step_latency_us: float = 10.0
    checkpoint_write_gb_s: float = 2.0
    checkpoint_hash_gb_s: float = 0.58
    rgb_bytes_per_frame: int = 12 * 1024
    flow_bytes_per_frame: int = 24 * 1024


SOURCES = {
    "train_videos": "Kinetics-400 (Kay et al. 2017): about 240k training clips",
    "validation_videos": "Kinetics-400: about 20k validation clips (prepared too: the teacher is evaluated on flow)",
    "video_seconds": "Kinetics-400 clips are cut to 10 s",
    "classes": "Kinetics-400",
    "nvlink_bus_gb_s": "H100 SXM NVLink 4: 900 GB/s both ways, 450 each way (NVIDIA's datasheet); 80% of it as "
                       "NCCL's all-reduce bus bandwidth, assumed",
    "nvlink_step_latency_us": "assumed: a ring step inside a node; nccl-tests time small all-reduces in 10-20 us",
    "nic_bus_gb_s": "one ConnectX-7 NDR InfiniBand NIC: 400 Gb/s = 50 GB/s each way; 80% of it, assumed",
    "nics_per_node": "one NIC a GPU, as NVIDIA's DGX H100 reference design (a ring of the job uses each)",
    "infiniband_step_latency_us": "assumed: a ring step between nodes, twice the NVLink step's",
    "checkpoint_write_gb_s": "assumed: one job's share of a parallel file system's write bandwidth",
    "checkpoint_hash_gb_s": "hashlib SHA-256 on one core of the development VM (AMD EPYC, SHA-NI), measured once "
                            "2026-12-07; rank 0 reads back and hashes every checkpoint file (train/checkpoint.py)",
    "rgb_bytes_per_frame": "assumed, not measured on real video: VP9 at prep.crf 10, 256x340 (no results file "
                           "records shard bytes yet)",
    "flow_bytes_per_frame": "assumed, not measured on real video: VP9 at prep.flow_crf 0, the two flow fields side "
                            "by side (256x680)",
}


class MissingInput(LookupError):
    """A results file or key the plan needs is not there."""


def describe(keys: tuple) -> str:
    """`results[precision=bf16, batch=8].teacher.median_step_s`: the key path as the error and the table name it."""
    text = ""
    for key in keys:
        if isinstance(key, dict):
            text += "[" + ", ".join(f"{name}={value}" for name, value in key.items()) + "]"
        else:
            text += ("." if text else "") + (key if key.isidentifier() else f'["{key}"]')
    return text.replace('.["', '["')


class Inputs:
    """Measured figures read from the results files, each remembered with the file and key it came from."""

    def __init__(self, results: Path):
        self.results, self.sources = results, {}

    def read(self, label: str, file: str, *keys) -> Any:
        path = self.results / file
        try:
            value = json.loads(path.read_text())
        except FileNotFoundError:
            raise MissingInput(f"{path}: no such results file (the plan needs {describe(keys)} from it)") from None
        for depth, key in enumerate(keys, 1):
            if isinstance(key, dict):
                rows = [row for row in value if all(row.get(k) == v for k, v in key.items())] \
                    if isinstance(value, list) else []
                if not rows:
                    raise MissingInput(f"{path}: no entry {describe(keys[:depth])}")
                value = rows[0]
            elif isinstance(value, dict) and key in value:
                value = value[key]
            else:
                raise MissingInput(f"{path}: no key {describe(keys[:depth])}")
        self.sources[label] = {"value": value, "source": f"{file}: {describe(keys)}"}
        return value


@dataclass(frozen=True)
class Measured:
    prep_seconds_per_video: list[float]  # one core, each measured video
    prep_frames: int
    prep_frame_size: tuple[int, int]
    prep_load_average: float
    step_seconds: dict[str, float]  # bare model step (bf16), per stage
    stage_step_seconds: dict[str, float]  # real stage through the job path, data wait included
    gpu: str


def read_measured(inputs: Inputs, spec: Spec, spec_path: Path) -> Measured:
    """The figures the plan rests on, at the spec's flow settings and clip geometry: a figure measured at other
    settings is refused rather than used."""
    flow, data, model = spec.prep.flow, spec.data, spec.model
    setting = ("farneback" if flow.algorithm == "farneback"
               else f"tvl1 (jobs/: OpenCV defaults, {flow.scales} scales x {flow.warps} warps)")
    prep = ("dataprep.json", "settings", setting)
    row = {"precision": "bf16", "width": model.width, "frames": data.clip_frames, "size": data.crop_size,
           "batch": data.batch_size}
    geometry = {"clip_frames": data.clip_frames, "crop": data.crop_size, "batch": data.batch_size,
                "width": model.width}
    measured_geometry = {name: inputs.read(f"stage clip geometry: {name}", "data_wait_h100.json", "args", name)
                         for name in geometry}
    if measured_geometry != geometry:
        raise MissingInput(f"{inputs.results / 'data_wait_h100.json'}: args {measured_geometry} are not "
                           f"{spec_path}'s geometry {geometry}")
    return Measured(
        prep_seconds_per_video=inputs.read("prep seconds per video, one core", *prep, "seconds_per_video"),
        prep_frames=inputs.read("prep frames per video", *prep, "frames"),
        prep_frame_size=tuple(inputs.read("prep frame size", *prep, "frame_size")),
        prep_load_average=inputs.read("prep 1-min load average, before and after", "dataprep.json",
                                      "load_average_1min_before_after")[0],
        step_seconds={stage: inputs.read(f"{stage} step s (bare, bf16)", "model_step_h100.json", "results", row,
                                         stage, "median_step_s") for stage in STAGES},
        stage_step_seconds={stage: inputs.read(f"{stage} stage step s (data wait included)", "data_wait_h100.json",
                                               "results", stage, "median_step_s") for stage in STAGES},
        gpu=inputs.read("GPU", "model_step_h100.json", "machine"),
    )


def allreduce_seconds(nbytes: float, world: int, gpus_per_node: int, assumed: Assumptions) -> float:
    """Ring all-reduce: 2(n-1) steps, each moving nbytes/n per rank and paying one step's latency, at the bus
    bandwidth of the ring's slowest link. Between nodes a ring goes through every NIC of a node at once (NCCL's
    channels), capped by NVLink. ZeRO-1's reduce-scatter then all-gather moves the same bytes."""
    if world == 1:
        return 0.0
    if world <= gpus_per_node:
        bandwidth, latency = assumed.nvlink_bus_gb_s, assumed.nvlink_step_latency_us
    else:
        bandwidth = min(assumed.nvlink_bus_gb_s, assumed.nics_per_node * assumed.nic_bus_gb_s)
        latency = assumed.infiniband_step_latency_us
    return 2 * (world - 1) / world * nbytes / (bandwidth * GB) + 2 * (world - 1) * latency * 1e-6


def trained_parameters(spec: Spec, classes: int) -> dict[str, int]:
    """Parameters each stage's engine optimises (and all-reduces the gradients of), counted on the meta device."""
    with torch.device("meta"):
        teacher = S3DG(classes, in_channels=2, width=spec.model.width, gating=spec.model.gating)
        student = S3DG(classes, in_channels=3, width=spec.model.width, gating=spec.model.gating)
        target = spec.student.distill.target
        if target != "logits":
            student = FeatureDistillation(student, teacher.endpoint_channels[target], target)
    return {"teacher": sum(p.numel() for p in teacher.parameters()),
            "student": sum(p.numel() for p in student.parameters())}


@functools.lru_cache
def feature_map_shapes(width: float, gating: bool, frames: int, size: int) -> dict[str, tuple[int, ...]]:
    """One clip's map at every S3D-G layer a student can match, in one pass on the meta device (no compute):
    `train.teacher_outputs.output_shape` answers for one target a pass, and a pass takes seconds."""
    with torch.device("meta"):
        teacher = S3DG(1, in_channels=2, width=width, gating=gating)
        clip = torch.empty(1, 2, frames, size, size)
    with torch.no_grad():
        maps = teacher.endpoints(clip, FEATURE_LAYERS)
    return {layer: tuple(maps[layer].shape[1:]) for layer in FEATURE_LAYERS}


def teacher_output_bytes(spec: Spec, classes: int) -> dict[str, int]:
    """Bytes of one clip's stored teacher output (`student.distill.precompute`), per distillation target, at the
    spec's clip geometry."""
    shapes = {"logits": (classes,), **feature_map_shapes(spec.model.width, spec.model.gating, spec.data.clip_frames,
                                                         spec.data.crop_size)}
    return {target: int(np.prod(shape)) * np.dtype(stored_dtype(target)).itemsize for target, shape in shapes.items()}


def world_layout(spec: Spec, world: int) -> Spec:
    """The spec on `world` GPUs; the global batch kept where the world divides it, else raised to the smallest
    multiple of clips a rank x world (what the spec's refusal proposes, with the learning rates to scale)."""
    per_node = spec.cluster.gpus_per_node or spec.cluster.tasks_per_node
    nodes = max(1, world // per_node)
    tasks = world // nodes
    micro = spec.data.batch_size * world
    batch = -(-spec.deepspeed.global_batch_size // micro) * micro
    return spec.with_overrides(**{"cluster.nodes": nodes, "cluster.tasks_per_node": tasks,
                                  "cluster.gpus_per_node": tasks, "deepspeed.global_batch_size": batch})


def make_plan(results: Path = RESULTS, spec_path: Path = SPEC_PATH, assumed: Assumptions = Assumptions(),
              gpu_counts: tuple[int, ...] = GPU_COUNTS) -> dict:
    spec = load_spec(spec_path)
    inputs = Inputs(results)
    measured = read_measured(inputs, spec, spec_path)
    videos = assumed.train_videos + assumed.validation_videos
    frames = round(assumed.video_seconds * spec.prep.fps)
    if not spec.prep.frame_size:
        raise MissingInput(f"{spec_path}: no prep.frame_size (the plan scales prep and shards to the stored frames)")
    height, width = spec.prep.frame_size
    per_node = spec.cluster.gpus_per_node or spec.cluster.tasks_per_node
    cores_per_node = spec.cluster.cpus_per_task * spec.cluster.tasks_per_node

    # Prep: flow between frame pairs dominates and scales with pairs and pixels.
    prep_scale = ((frames - 1) / (measured.prep_frames - 1)
                  * (height * width) / (measured.prep_frame_size[0] * measured.prep_frame_size[1]))
    seconds = sorted(measured.prep_seconds_per_video)
    prep_core_hours = {name: videos * value * prep_scale / 3600 for name, value in
                       (("median", statistics.median(seconds)), ("fastest", seconds[0]), ("slowest", seconds[-1]))}

    stream_bytes = {"rgb": frames * assumed.rgb_bytes_per_frame, "flow": frames * assumed.flow_bytes_per_frame}
    read_per_clip = {"teacher": stream_bytes["flow"], "student": stream_bytes["rgb"] + stream_bytes["flow"]}
    outputs_per_clip = teacher_output_bytes(spec, assumed.classes)
    parameters = trained_parameters(spec, assumed.classes)
    gradient_bytes = {stage: 4 * count for stage, count in parameters.items()}  # fp32 (grad_accum_dtype)
    checkpoint_bytes = {stage: count * 4 * (2 + OPTIMIZER_BUFFERS[getattr(spec, stage).optimizer.name])
                        for stage, count in parameters.items()}
    checkpoint_seconds = {stage: size / (assumed.checkpoint_write_gb_s * GB) + size / (assumed.checkpoint_hash_gb_s * GB)
                          for stage, size in checkpoint_bytes.items()}
    every = spec.checkpoint.every_steps
    batch = spec.data.batch_size
    stages = {}
    for stage in STAGES:
        epochs = getattr(spec, stage).epochs
        clips = epochs * assumed.train_videos
        step, stage_step = measured.step_seconds[stage], measured.stage_step_seconds[stage]
        stages[stage] = {
            "epochs": epochs, "clips": clips,
            "clips_per_s_per_gpu": {"step": batch / step, "stage": batch / stage_step},
            "gpu_hours_ideal": {"step": clips * step / batch / 3600, "stage": clips * stage_step / batch / 3600},
            "checkpoint_bytes": checkpoint_bytes[stage],
            "checkpoint_seconds": checkpoint_seconds[stage],
            "checkpoint_interval_seconds": {"step": every * step, "stage": every * stage_step},
            "checkpoint_share": {name: checkpoint_seconds[stage] / (every * s + checkpoint_seconds[stage])
                                 for name, s in (("step", step), ("stage", stage_step))},
        }

    scales = []
    for world in gpu_counts:
        layout = world_layout(spec, world)
        accumulation = layout.grad_accumulation
        row = {"gpus": world, "nodes": layout.cluster.nodes, "global_batch": layout.deepspeed.global_batch_size,
               "spec_global_batch_fits": layout.deepspeed.global_batch_size == spec.deepspeed.global_batch_size,
               "accumulation": accumulation,
               "optimizer_steps_per_epoch": assumed.train_videos // layout.deepspeed.global_batch_size,
               "prep_wall_hours_on_these_nodes": prep_core_hours["median"] / (layout.cluster.nodes * cores_per_node),
               "stages": {}}
        for stage in STAGES:
            allreduce = allreduce_seconds(gradient_bytes[stage], world, per_node, assumed)
            timing = {"step": measured.step_seconds[stage], "stage": measured.stage_step_seconds[stage]}
            efficiency = {name: accumulation * s / (accumulation * s + allreduce) for name, s in timing.items()}
            gpu_hours = {name: stages[stage]["gpu_hours_ideal"][name] / efficiency[name] for name in timing}
            row["stages"][stage] = {
                "allreduce_seconds": allreduce,
                "allreduce_over_step": allreduce / (accumulation * timing["step"]),
                "efficiency": efficiency,
                "gpu_hours": gpu_hours,
                "wall_hours": {name: hours / world for name, hours in gpu_hours.items()},
                "shard_read_gb_s_at_step_rate": world * batch / timing["step"] * efficiency["step"]
                                                * read_per_clip[stage] / GB,
                "crash_loses_gpu_hours_at_most": (every - 1) * timing["stage"] * world / 3600,
            }
        scales.append(row)

    return {
        "spec": str(spec_path),
        "inputs": {
            "measured": inputs.sources,
            "from_the_code": {
                "parameters": parameters, "gradient_bytes": gradient_bytes,
                "teacher_output_bytes_per_clip": outputs_per_clip,
                "checkpoint_bytes_per_parameter": {stage: 4 * (2 + OPTIMIZER_BUFFERS[getattr(spec, stage).optimizer.name])
                                                   for stage in STAGES},
                "frames_per_video": frames, "frame_size": [height, width], "clip_frames": spec.data.clip_frames,
                "crop_size": spec.data.crop_size, "batch_per_gpu": batch, "checkpoint_every_steps": every,
                "gpus_per_node": per_node, "cores_per_node": cores_per_node,
                "optimizers": {stage: getattr(spec, stage).optimizer.name for stage in STAGES},
            },
            "assumed": {name: {"value": value, "source": SOURCES[name]} for name, value in asdict(assumed).items()},
        },
        "gpu": measured.gpu,
        "prep": {"scale_from_measured": prep_scale, "measured_frames": measured.prep_frames,
                 "measured_frame_size": list(measured.prep_frame_size),
                 "measured_load_average": measured.prep_load_average, "videos": videos,
                 "core_hours": prep_core_hours},
        "storage": {
            "shards_bytes": videos * (stream_bytes["rgb"] + stream_bytes["flow"]),
            "stream_bytes_per_video": stream_bytes,
            "teacher_outputs_bytes": {target: size * assumed.train_videos * (spec.student.epochs + 1)
                                      for target, size in outputs_per_clip.items()},
        },
        "stages": stages,
        "scales": scales,
    }


def render(plan: dict) -> str:
    """The plan as the text BENCHMARKS.md quotes: inputs with their sources, then markdown tables."""
    code, measured, assumed = (plan["inputs"][k] for k in ("from_the_code", "measured", "assumed"))
    prep, storage, stages = plan["prep"], plan["storage"], plan["stages"]
    lines = [f"D3D on Kinetics-400 ({plan['spec']}) on paper; GPU figures from: {plan['gpu']}", "",
             "Measured (benchmarks/results/):"]
    for label, entry in measured.items():
        value = entry["value"]
        shown = ", ".join(f"{v:.3g}" for v in value) if isinstance(value, list) else (
            f"{value:.4g}" if isinstance(value, float) else str(value))
        lines.append(f"- {label}: {shown}  ({entry['source']})")
    lines += ["", "From the code and the spec:",
              f"- parameters: teacher {code['parameters']['teacher']:,}, student {code['parameters']['student']:,} "
              f"(S3D-G, {assumed['classes']['value']} classes); fp32 gradients "
              f"{code['gradient_bytes']['teacher'] / 1e6:.1f} / {code['gradient_bytes']['student'] / 1e6:.1f} MB",
              f"- checkpoint: {code['checkpoint_bytes_per_parameter']['teacher']} bytes a parameter "
              f"({code['optimizers']['teacher']}: weights, ZeRO's fp32 partition, optimizer state), every "
              f"{code['checkpoint_every_steps']} micro-steps",
              f"- {code['frames_per_video']} frames a video at {code['frame_size'][0]}x{code['frame_size'][1]}; "
              f"clips {code['clip_frames']}x{code['crop_size']}x{code['crop_size']}, {code['batch_per_gpu']} a GPU; "
              f"{code['gpus_per_node']} GPUs and {code['cores_per_node']} cores a node",
              "", "Assumed (benchmarks/plan.py, Assumptions):"]
    lines += [f"- {name} = {entry['value']:,}: {entry['source']}" for name, entry in assumed.items()]

    core = prep["core_hours"]
    lines += ["", f"Prep ({prep['videos']:,} videos): the measured seconds a video x {prep['scale_from_measured']:.2f} "
              f"({code['frames_per_video'] - 1} flow pairs over {prep['measured_frames'] - 1}, pixels "
              f"{code['frame_size'][0]}x{code['frame_size'][1]} over {prep['measured_frame_size'][0]}x"
              f"{prep['measured_frame_size'][1]}): {core['median']:,.0f} core-hours at the median video "
              f"({core['fastest']:,.0f} to {core['slowest']:,.0f} at the fastest and slowest measured), measured at "
              f"load average {prep['measured_load_average']:.1f} on 2 cores",
              "", "| storage | bytes |", "|---|---|",
              f"| shards, RGB + flow ({storage['stream_bytes_per_video']['rgb'] / 1e6:.1f} + "
              f"{storage['stream_bytes_per_video']['flow'] / 1e6:.1f} MB a video) | {storage['shards_bytes'] / 1e12:.2f} TB |"]
    per_clip = code["teacher_output_bytes_per_clip"]
    lines += [f"| teacher outputs, {target} ({per_clip[target]:,} B a clip, {stages['student']['epochs']} + 1 epochs) "
              f"| {size / 1e12:.3f} TB |" for target, size in storage["teacher_outputs_bytes"].items()]

    lines += ["", "| stage | clips/s a GPU, step / stage | GPU-hours at 100%, step / stage | checkpoint | "
              "checkpoint share of its interval, step / stage |", "|---|---|---|---|---|"]
    for stage, figures in stages.items():
        rate, hours, share = figures["clips_per_s_per_gpu"], figures["gpu_hours_ideal"], figures["checkpoint_share"]
        lines.append(f"| {stage} ({figures['epochs']} epochs) | {rate['step']:.1f} / {rate['stage']:.1f} | "
                     f"{hours['step']:,.0f} / {hours['stage']:,.0f} | {figures['checkpoint_bytes'] / 1e6:.0f} MB, "
                     f"{figures['checkpoint_seconds']:.2f} s | {share['step']:.1%} / {share['stage']:.1%} |")

    lines += ["", "| GPUs | nodes | global batch (accumulation) | prep wall h on their cores | stage | all-reduce ms "
              "| efficiency, step / stage | GPU-hours, step / stage | wall hours, step / stage | shard reads GB/s "
              "at the step rate | a crash loses GPU-h |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in plan["scales"]:
        batch = f"{row['global_batch']} ({row['accumulation']})" + ("" if row["spec_global_batch_fits"] else " *")
        for stage, s in row["stages"].items():
            lines.append(
                f"| {row['gpus']} | {row['nodes']} | {batch} | {row['prep_wall_hours_on_these_nodes']:.1f} | {stage} | "
                f"{s['allreduce_seconds'] * 1e3:.2f} | {s['efficiency']['step']:.1%} / {s['efficiency']['stage']:.1%} | "
                f"{s['gpu_hours']['step']:,.0f} / {s['gpu_hours']['stage']:,.0f} | "
                f"{s['wall_hours']['step']:.2f} / {s['wall_hours']['stage']:.2f} | "
                f"{s['shard_read_gb_s_at_step_rate']:.1f} | {s['crash_loses_gpu_hours_at_most']:.2f} |")
    if not all(row["spec_global_batch_fits"] for row in plan["scales"]):
        lines.append("\n* the spec's global batch does not fit that world: raised to clips a GPU x GPUs "
                     "(learning rates to scale with it)")
    lines += ["", "step: the bare bf16 model step (model_step); stage: the real stage, data wait included "
              "(data_wait). Efficiency: compute over compute + all-reduce per optimizer step, no overlap "
              "(DeepSpeed's ZeRO-1 default)."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS, help="the measured results files")
    parser.add_argument("--spec", type=Path, default=SPEC_PATH)
    parser.add_argument("--out", type=Path, default=RESULTS / "plan_kinetics400.json")
    args = parser.parse_args()
    try:
        plan = make_plan(args.results, args.spec)
    except MissingInput as error:
        raise SystemExit(f"benchmarks.plan: {error}") from None
    print(render(plan))
    write_report(plan, args.out)


if __name__ == "__main__":
    main()
