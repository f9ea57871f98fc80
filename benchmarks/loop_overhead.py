"""What the training loop itself costs the host per step: `train.loop.train` over a tiny network on batches decoded
once beforehand, against the same network's step alone (forward, `Stage.loss`, backward, optimizer step), in
alternating rounds of one run. The difference is the loop's own work per step: the flags all-reduce, reading the
step's figures back from the device, the gradient norm, the Prometheus metrics, rank 0's train log and its
TensorBoard event files, the loader state.

    .venv/bin/python -m benchmarks.loop_overhead --out benchmarks/results/loop_overhead.json

The network is a linear classifier of 2 x 4 x 8 x 8 flow clips, batch 8, on one thread, so that a step is mostly
overhead. The engine is a stand-in with DeepSpeed's interface over torch's AdamW (the loop reads its gradient norm
as it does ZeRO-0's): DeepSpeed's own step, some 4 ms on a 2-core VM, varies by more than the loop costs. A one-rank
gloo process group is up, so the flags all-reduce runs as on a cluster (and is also timed alone). The loop logs
every step (as rank 0 does) and updates the metrics; no checkpoints. It is timed once per `--report-every` value
(`metrics.report_every_steps`: steps between two reads of the step figures); a tree from before that setting
existed is timed as it is (reported as `"report_every": null`), which is how BENCHMARKS.md's baseline was taken.
`--device cuda` runs the same on a GPU (each timing then ends with a synchronisation). `--smoke`: 2 rounds of 5
steps.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks import parse_args, write_report
from d3d_cluster.data.pipeline import Batch, LoaderState
from d3d_cluster.metrics import TrainMetrics
from d3d_cluster.spec import StageSpec
from d3d_cluster.train.loop import train
from d3d_cluster.train.stages import Stage

SMOKE = {"rounds": 2, "steps": 5, "report_every": [1, 2]}
CLIP = (2, 4, 8, 8)  # channels, frames, height, width
CLASSES = 3


class PlainEngine:
    """What the loop asks of a DeepSpeed engine, over a plain optimizer: one micro-step per optimizer step."""

    def __init__(self, module: torch.nn.Module, device: torch.device, lr: float = 1e-3):
        self.module, self.device = module.to(device), device
        self.optimizer = torch.optim.AdamW(module.parameters(), lr=lr)
        self.micro_steps = 0

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.module(inputs)

    def train(self) -> None:
        self.module.train()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.micro_steps += 1

    def is_gradient_accumulation_boundary(self) -> bool:
        return True

    def gradient_accumulation_steps(self) -> int:
        return 1

    def zero_optimization(self) -> bool:
        return False

    def bfloat16_enabled(self) -> bool:
        return False

    def get_global_grad_norm(self):
        return None

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]


class PreDecoded:
    """What the loop asks of a `ClipLoader`, over batches made once: no decoding, no reading."""

    def __init__(self, batches: list[Batch]):
        self._batches, self.end_epoch, self.skipped = batches, 1, []
        self.items = sum(len(batch.labels) for batch in batches)
        self.steps_per_epoch = len(batches)
        self._taken, self._consumed = 0, 0  # batches and clips handed out

    def state(self) -> LoaderState:
        return LoaderState(*((1, 0) if self._consumed == self.items else (0, self._consumed)), 0, "predecoded")

    def steps_left(self) -> int:
        return len(self._batches) - self._taken

    def batches(self):
        for batch in self._batches[self._taken:]:
            self._taken, self._consumed = self._taken + 1, self._consumed + len(batch.labels)
            yield batch


def _batches(steps: int, batch: int, device: torch.device) -> list[Batch]:
    """Clips on the device, labels and ids on the host (pinned for a GPU), as the loader hands them out."""
    generator = torch.Generator().manual_seed(0)
    pin = device.type == "cuda"
    batches = []
    for _ in range(steps):
        labels = torch.randint(0, CLASSES, (batch,), generator=generator)
        batches.append(Batch(None, torch.randn(batch, *CLIP, generator=generator).to(device),
                             labels.pin_memory() if pin else labels, torch.arange(batch),
                             torch.zeros(batch, dtype=torch.int64), torch.zeros(batch, dtype=torch.int64)))
    return batches


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bare_seconds(engine: PlainEngine, stage: Stage, batches: list[Batch]) -> float:
    """The network's step alone: what any loop must do."""
    gc.collect()  # the garbage of earlier runs (metrics registries) is not collected while this one is timed
    _synchronize(engine.device)
    started = time.perf_counter()
    for batch in batches:
        loss = stage.loss(engine(stage.inputs(batch)), batch)
        engine.backward(loss.total)
        engine.step()
    _synchronize(engine.device)
    return (time.perf_counter() - started) / len(batches)


def _loop_seconds(engine: PlainEngine, stage: Stage, batches: list[Batch], log: Path,
                  report_every: int | None) -> float:
    metrics = TrainMetrics("bench", stage.name, 0, job_id="1")
    options = {} if report_every is None else {"report_every": report_every}
    gc.collect()
    _synchronize(engine.device)
    started = time.perf_counter()
    summary = train(engine, stage, PreDecoded(batches), metrics, world=1, log_path=log, **options)
    _synchronize(engine.device)
    seconds = time.perf_counter() - started
    assert summary.steps == len(batches) and len(log.read_text().splitlines()) == len(batches)
    log.unlink()
    return seconds / len(batches)


def _flags_seconds(device: torch.device, repeats: int) -> float:
    """The median of the step's one collective alone: the NaN and stop flags all-reduced and read (`any_rank`)."""
    from d3d_cluster.collectives import any_rank

    loss, times = torch.ones((), device=device), []
    for _ in range(repeats):
        started = time.perf_counter()
        any_rank(~torch.isfinite(loss).all(), False)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _single_rank_group() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15, help="alternating rounds of bare steps and loop runs")
    parser.add_argument("--steps", type=int, default=500, help="steps per round")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--report-every", type=int, nargs="+", default=[1, 10],
                        help="loop runs per round, one per value (ignored by a loop without the setting)")
    parser.add_argument("--out", default="benchmarks/results/loop_overhead.json")
    args = parse_args(parser, SMOKE)

    torch.set_num_threads(1)
    device = torch.device(args.device)
    _single_rank_group()
    configurable = "report_every" in inspect.signature(train).parameters
    variants = args.report_every if configurable else [None]
    stage = Stage("teacher", "flow", StageSpec())
    batches = _batches(args.steps, args.batch, device)
    torch.manual_seed(0)
    engine = PlainEngine(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(int(torch.tensor(CLIP).prod()),
                                                                                   CLASSES)), device)
    bare, loops = [], {variant: [] for variant in variants}
    with tempfile.TemporaryDirectory() as scratch:
        log = Path(scratch) / "train_log.jsonl"
        _bare_seconds(engine, stage, batches[:20])  # warm-up
        for variant in variants:
            _loop_seconds(engine, stage, batches[:20], log, variant)
        for _ in range(args.rounds):
            bare.append(_bare_seconds(engine, stage, batches))
            for variant in variants:
                loops[variant].append(_loop_seconds(engine, stage, batches, log, variant))
    flags = _flags_seconds(device, args.steps)
    dist.destroy_process_group()
    results = []
    for variant, seconds in loops.items():
        overhead = [loop - alone for loop, alone in zip(seconds, bare)]  # paired: the same round
        results.append({"report_every": variant, "loop_step_us": [s * 1e6 for s in seconds],
                        "loop_step_median_us": statistics.median(seconds) * 1e6,
                        "overhead_per_step_us": [o * 1e6 for o in overhead],
                        "overhead_median_us": statistics.median(overhead) * 1e6})
    report = {"setup": {"rounds": args.rounds, "steps": args.steps, "batch": args.batch, "clip": list(CLIP),
                        "threads": 1, "device": str(device), "loop_configurable": configurable},
              "bare_step_us": [s * 1e6 for s in bare], "bare_step_median_us": statistics.median(bare) * 1e6,
              "flags_all_reduce_median_us": flags * 1e6,
              "results": results, "machine": platform.machine(), "cpus": os.cpu_count(),
              "python": platform.python_version(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    write_report(report, args.out)
    print(json.dumps({key: report[key] for key in ("bare_step_median_us", "flags_all_reduce_median_us")}
                     | {f"report_every={r['report_every']}": {"loop_step_median_us": r["loop_step_median_us"],
                                                             "overhead_median_us": r["overhead_median_us"]}
                        for r in results}, indent=2))


if __name__ == "__main__":
    main()
