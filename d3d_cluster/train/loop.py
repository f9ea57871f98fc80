"""The one training loop, for every stage: read a batch, forward, loss, backward, step, report."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from d3d_cluster.data.pipeline import ClipLoader
from d3d_cluster.metrics import TrainMetrics
from d3d_cluster.train.engine import autocast, step_with_grad_norm
from d3d_cluster.train.stages import Stage


@dataclass
class TrainSummary:
    steps: int  # micro-steps on this rank
    clips: int  # clips seen by the whole world
    seconds: float  # wall time of the loop, data loading included
    clips_per_second: float  # world throughput
    final_loss: float


def train(engine, stage: Stage, loader: ClipLoader, epochs: int, metrics: TrainMetrics, world: int,
          log_path: Path | None = None, print_every: int = 0) -> TrainSummary:
    """Train `epochs` epochs; rank 0 passes `log_path` to keep a JSON-lines record of every step."""
    engine.train()
    steps_per_epoch = len(loader)
    log = log_path.open("a") if log_path else None
    steps, clips, loss_value, corrupt_reported = 0, 0, float("nan"), 0
    started = time.perf_counter()
    metrics.plan(epochs, steps_per_epoch)
    try:
        for epoch in range(epochs):
            batches = loader.epoch(epoch)
            waited_from = time.perf_counter()
            for step_in_epoch, batch in enumerate(batches):
                ready = time.perf_counter()
                inputs = stage.inputs(batch).to(engine.device, non_blocking=True)
                with autocast(engine.device):
                    outputs = engine(inputs)
                    loss = stage.loss(outputs, batch)
                engine.backward(loss.total)
                grad_norm = step_with_grad_norm(engine)
                done = time.perf_counter()
                steps += 1
                clips += len(batch.labels) * world
                loss_value = loss.total.item()
                progress = epoch + (step_in_epoch + 1) / steps_per_epoch
                learning_rate = engine.get_lr()[0]
                metrics.observe_step(len(batch.labels), done - waited_from, ready - waited_from, loss_value,
                                     loss.distillation.item(), learning_rate, progress, grad_norm,
                                     samples=len(batch.samples))
                if len(loader.skipped) > corrupt_reported:
                    metrics.corrupt_samples(len(loader.skipped) - corrupt_reported)
                    corrupt_reported = len(loader.skipped)
                if log:
                    record = {"step": steps, "epoch": round(progress, 4), "loss": loss_value,
                              "cross_entropy": loss.cross_entropy.item(), "distillation": loss.distillation.item(),
                              "lr": learning_rate, "grad_norm": grad_norm, "step_seconds": done - waited_from,
                              "data_wait_seconds": ready - waited_from,
                              "accuracy": (stage.logits(outputs).argmax(1).cpu() == batch.labels).float().mean().item(),
                              "clips_per_second": len(batch.labels) * world / (done - waited_from)}
                    log.write(json.dumps(record) + "\n")
                if print_every and steps % print_every == 0:
                    print(f"[{stage.name}] epoch {progress:.2f} step {steps} loss {loss_value:.4f} "
                          f"lr {learning_rate:.2e}", flush=True)
                waited_from = time.perf_counter()
    finally:
        if log:
            log.close()
    seconds = time.perf_counter() - started
    return TrainSummary(steps, clips, seconds, clips / seconds if seconds > 0 else 0.0, loss_value)


@torch.no_grad()
def predict(model: torch.nn.Module, modality: str, loader: ClipLoader, device: torch.device):
    """Logits of this rank's share of the split's views, with the sample and view ids they belong to."""
    model.eval()
    samples, views, logits, labels = [], [], [], []
    for batch in loader.epoch(loader.first_epoch):
        with autocast(device):
            logits.append(model(getattr(batch, modality).to(device)).float().cpu())
        samples.append(batch.samples)
        views.append(batch.views)
        labels.append(batch.labels)
    return torch.cat(samples), torch.cat(views), torch.cat(logits), torch.cat(labels)
