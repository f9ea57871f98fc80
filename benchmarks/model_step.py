"""Training-step throughput of the two D3D steps, on synthetic clips already on the device:

- teacher step: flow clip -> S3D-G forward, cross-entropy, backward, AdamW step;
- student step: the frozen teacher's forward on the flow clip, then the same on the RGB clip with the D3D loss.

It runs the project's own step pieces (`Stage.loss`, `train.engine.autocast`), one process, no DeepSpeed and no
data loading, so it measures the model. Per shape and precision it reports the median step time over the
timed steps, clips/s, the student/teacher time ratio and, on a GPU, MFU: the step's model FLOPs (2 per
multiply-add, from `model_info`; x3 for forward + backward, x1 for the teacher's forward in the student step)
divided by time and by the card's dense bf16 peak (`--card`, default h100: 989 TFLOP/s), and the share of the
step's rooflines it reached (`d3dc model-info --roofline`: the clips/s the card's bandwidth allows for the bytes the
step moves, unfused and with BatchNorm and ReLU folded into the convolutions).

    python -m benchmarks.model_step --out benchmarks/results/model_step_cpu.json                 # CPU: fp32
    python -m benchmarks.model_step --shapes 1.0:64:224:8 --precisions bf16 fp32 \\
        --out benchmarks/results/model_step_h100.json                                            # GPU

A shape is WIDTH:FRAMES:SIZE:BATCH (clips per step). `--pooling 3d` is the baseline of the network's separable
max-pooling (`models.s3dg.MaxPool3d`): every pool replaced by torch's `nn.MaxPool3d` of the same size, the same
values. `--profile` (GPU) adds, per step kind and precision, the kernels that took most of the device's time over
3 profiled steps (torch profiler), to say where the time goes. `--smoke`: shape 0.25:8:32:2, 1 warm-up and 1 timed
step, on one thread (beside other work, spinning OpenMP threads made a tiny step some 70 times slower).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from benchmarks import parse_args, write_report
from d3d_cluster.data.pipeline import Batch
from d3d_cluster.models import S3DG
from d3d_cluster.models.s3dg import MaxPool3d
from d3d_cluster.models.info import model_info
from d3d_cluster.spec import DistillSpec, Spec
from d3d_cluster.train.engine import autocast, build_optimizer, prepare_device
from d3d_cluster.train.roofline import CARDS, training_step
from d3d_cluster.train.stages import Stage

CLASSES = 400
CPU_SHAPES = ["0.25:16:64:8", "1.0:16:112:4"]
SMOKE = {"shapes": ["0.25:8:32:2"], "steps": 1, "warmup": 1, "threads": 1}


def _with_3d_pooling(network: torch.nn.Module) -> torch.nn.Module:
    for parent in list(network.modules()):
        for name, child in parent.named_children():
            if isinstance(child, MaxPool3d):
                setattr(parent, name, torch.nn.MaxPool3d(child.kernel_size, child.stride, child.padding,
                                                         ceil_mode=child.ceil_mode))
    return network


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_seconds(stage: Stage, network: torch.nn.Module, batch: Batch, device: torch.device, precision: str,
                  warmup: int, steps: int) -> list[float]:
    optimizer = build_optimizer(Spec().teacher.optimizer, network)
    times = []
    for i in range(warmup + steps):
        _synchronize(device)
        started = time.perf_counter()
        with autocast(device):
            loss = stage.loss(network(stage.inputs(batch)), batch)
        loss.total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - started)
    return times


def _top_kernels(stage: Stage, network: torch.nn.Module, batch: Batch, device: torch.device, precision: str,
                 steps: int = 3, top: int = 12) -> list[dict]:
    """The kernels with the most device time over `steps` steps: name, milliseconds a step, share of the total."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as profile:
        _step_seconds(stage, network, batch, device, precision, 0, steps)
    kernels = [event for event in profile.key_averages() if event.self_device_time_total > 0]
    total = sum(event.self_device_time_total for event in kernels)
    kernels.sort(key=lambda event: event.self_device_time_total, reverse=True)
    return [{"kernel": event.key[:120], "ms_per_step": event.self_device_time_total / 1e3 / steps,
             "share": event.self_device_time_total / total, "calls_per_step": event.count / steps}
            for event in kernels[:top]]


def measure(width: float, frames: int, size: int, batch_size: int, precision: str, device: torch.device,
            warmup: int, steps: int, card: dict, compile: bool, profile: bool = False,
            pooling: str = "separable") -> dict:
    if precision == "bf16" and device.type != "cuda":
        raise SystemExit("bf16 is the GPU path (autocast on CUDA); the CPU trains in fp32")
    torch.manual_seed(0)
    batch = Batch(rgb=torch.randn(batch_size, 3, frames, size, size, device=device),
                  flow=torch.randn(batch_size, 2, frames, size, size, device=device).clamp(-1, 1),
                  labels=torch.randint(0, CLASSES, (batch_size,), device=device), samples=torch.arange(batch_size),
                  views=torch.zeros(batch_size, dtype=torch.long),
                  epochs=torch.zeros(batch_size, dtype=torch.long))
    teacher_net = S3DG(CLASSES, in_channels=2, width=width).to(device)
    frozen = S3DG(CLASSES, in_channels=2, width=width).to(device).eval().requires_grad_(False)
    student_net = S3DG(CLASSES, in_channels=3, width=width).to(device)
    if pooling == "3d":
        teacher_net, frozen, student_net = (_with_3d_pooling(m) for m in (teacher_net, frozen, student_net))
    if compile:
        teacher_net, frozen, student_net = (torch.compile(m) for m in (teacher_net, frozen, student_net))
    settings = Spec().student
    teacher_stage = Stage("teacher", "flow", settings)
    paper = DistillSpec(weight=1.0, target="logits")  # the paper's loss: the whole teacher runs each step
    student_stage = Stage("student", "rgb", settings, paper, frozen)
    # As a stage does: cuDNN's algorithm timing on, and fp32 true fp32 (no TF32 convolutions).
    prepare_device(device, "auto" if precision == "bf16" else "fp32")

    macs_teacher = model_info(CLASSES, 2, frames, size, width).multiply_adds
    macs_student = model_info(CLASSES, 3, frames, size, width).multiply_adds
    flops = {"teacher": 3 * 2 * macs_teacher * batch_size,
             "student": (3 * 2 * macs_student + 2 * macs_teacher) * batch_size}
    result = {"width": width, "frames": frames, "size": size, "batch": batch_size, "precision": precision,
              "compile": compile, "pooling": pooling,
              "gmacs_per_clip": {"teacher": macs_teacher / 1e9, "student": macs_student / 1e9}}
    for name, stage, network in (("teacher", teacher_stage, teacher_net), ("student", student_stage, student_net)):
        times = _step_seconds(stage, network, batch, device, precision, warmup, steps)
        median = statistics.median(times)
        entry = {"median_step_s": median, "min_step_s": min(times), "clips_per_s": batch_size / median,
                 "step_tflop": flops[name] / 1e12}
        if device.type == "cuda":
            entry["mfu"] = flops[name] / median / card["bf16_flops"]
            if precision == "bf16" and pooling == "separable":  # the step the roofline counts (bf16 bytes)
                limits = training_step(name, CLASSES, frames, size, width, batch_size=batch_size).limits(card)
                entry["roofline_clips_per_s"] = limits
                entry["share_of_memory_roofline"] = {kind: entry["clips_per_s"] / limits[f"memory_{kind}"]
                                                     for kind in ("unfused", "fused")}
            if profile:
                entry["top_kernels"] = _top_kernels(stage, network, batch, device, precision)
                for kernel in entry["top_kernels"]:
                    print(f"  {name} {precision}: {kernel['share']:6.1%} {kernel['ms_per_step']:8.2f} ms/step "
                          f"x{kernel['calls_per_step']:.0f} {kernel['kernel']}", flush=True)
        result[name] = entry
    result["student_over_teacher_time"] = result["student"]["median_step_s"] / result["teacher"]["median_step_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", help=f"WIDTH:FRAMES:SIZE:BATCH (default on CPU: {' '.join(CPU_SHAPES)}; "
                                                     "on a GPU also 1.0:64:224:8)")
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"],
                        help="default: fp32 on CPU, bf16 and fp32 on a GPU")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="CPU threads")
    parser.add_argument("--card", choices=sorted(CARDS), default="h100",
                        help="the GPU's peaks for MFU and the rooflines (SXM parts)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the networks")
    parser.add_argument("--profile", action="store_true", help="GPU: the top kernels of each step kind")
    parser.add_argument("--pooling", choices=["separable", "3d"], default="separable",
                        help="3d: torch's nn.MaxPool3d in place of the network's separable pools (the baseline)")
    parser.add_argument("--out", default="benchmarks/results/model_step.json")
    args = parse_args(parser, SMOKE)

    gpu = torch.cuda.is_available()
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    torch.set_num_threads(args.threads)
    shapes = args.shapes or (CPU_SHAPES + ["1.0:64:224:8"] if gpu else CPU_SHAPES)
    precisions = args.precisions or (["bf16", "fp32"] if gpu else ["fp32"])
    results = []
    for shape in shapes:
        width, frames, size, batch_size = shape.split(":")
        for precision in precisions:
            row = measure(float(width), int(frames), int(size), int(batch_size), precision, device, args.warmup,
                          args.steps, CARDS[args.card], args.compile, args.profile, args.pooling)
            print(json.dumps(row), flush=True)
            results.append(row)
    if gpu and "bf16" in precisions and "fp32" in precisions:
        for row in results:
            if row["precision"] == "bf16":
                fp32 = next(r for r in results if r["precision"] == "fp32" and
                            (r["width"], r["frames"], r["size"], r["batch"]) ==
                            (row["width"], row["frames"], row["size"], row["batch"]))
                row["bf16_speedup"] = {name: fp32[name]["median_step_s"] / row[name]["median_step_s"]
                                       for name in ("teacher", "student")}
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.node()} {platform.machine()}, {len(os.sched_getaffinity(0))} cores, "
                   f"{args.threads} threads" + (f", {torch.cuda.get_device_name(device)}" if gpu else ""),
        "torch": torch.__version__, "device": device.type, "steps": args.steps, "warmup": args.warmup,
        "card": CARDS[args.card] if gpu else None, "results": results,
    }
    write_report(report, args.out)


if __name__ == "__main__":
    main()
