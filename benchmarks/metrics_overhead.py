"""What monitoring costs a training step: one `observe_step` (counters, gauges, two histograms, the ETA) and one
scrape of a rank's registry, against a training micro-step of the tiny width-0.25 S3D-G, in one run.

    .venv/bin/python -m benchmarks.metrics_overhead --out benchmarks/results/metrics_overhead.json

The step is forward + backward + AdamW on a random 2 x 2 x 8 x 24 x 24 flow batch, one thread; no loader.
`--smoke`: 20 observations, 2 scrapes and 2 training steps.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from prometheus_client import generate_latest

from benchmarks import parse_args, write_report
from d3d_cluster.metrics import TrainMetrics
from d3d_cluster.models import S3DG

SMOKE = {"repeats": 20, "steps": 2}


def median_seconds(action, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2000, help="observations timed; scrapes: a tenth as many")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="benchmarks/results/metrics_overhead.json")
    args = parse_args(parser, SMOKE)

    torch.set_num_threads(1)
    metrics = TrainMetrics("bench", "teacher", 0, job_id="1")
    metrics.plan(epochs=10, steps_per_epoch=100)
    observe = median_seconds(lambda: metrics.observe_step(16, 0.1, 0.01, 1.0, 0.5, 1e-3, 0.5, grad_norm=2.0),
                             args.repeats)
    scrape = median_seconds(lambda: generate_latest(metrics.registry), max(1, args.repeats // 10))

    model = S3DG(num_classes=3, in_channels=2, width=0.25, gating=True)
    optimizer = torch.optim.AdamW(model.parameters())
    clips, labels = torch.randn(2, 2, 8, 24, 24), torch.tensor([0, 1])

    def train_step():
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(clips), labels).backward()
        optimizer.step()

    train_step()  # warm-up
    step = median_seconds(train_step, args.steps)
    result = {"observe_step_seconds": observe, "scrape_seconds": scrape, "train_step_seconds": step,
              "observe_over_step": observe / step, "machine": platform.machine(), "python": platform.python_version(),
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    write_report(result, args.out)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
