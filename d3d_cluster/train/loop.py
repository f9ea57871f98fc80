"""The one training loop, for every stage: read a batch, forward, loss, backward, step, report, checkpoint.

Each step ends with one all-reduce that makes every rank agree on two things: whether any rank's loss was NaN or
infinite (then no rank applies the step, and the step is counted as skipped), and whether any rank was told to
stop (a time limit or preemption signal). Checkpoints are taken only where a gradient accumulation window has just
closed, so that no partly accumulated gradient is lost and a resumed run takes exactly the steps it would have.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from d3d_cluster.collectives import any_rank
from d3d_cluster.data.pipeline import ClipLoader
from d3d_cluster.metrics import TrainMetrics
from d3d_cluster.train import checkpoint as checkpoints
from d3d_cluster.train.engine import autocast, step_with_grad_norm
from d3d_cluster.train.stages import Stage


@dataclass
class TrainSummary:
    steps: int  # global micro-steps the stage has run, earlier runs of a resumed job included
    clips: int  # clips the whole world trained on in this run
    skipped_steps: int  # steps not applied because a loss was NaN or infinite
    seconds: float  # wall time of the loop, data loading included
    clips_per_second: float  # world throughput
    final_loss: float
    stopped: bool  # told to stop; with checkpointing, a checkpoint at `steps` holds everything to resume from


class NonFiniteLoss(RuntimeError):
    """Too many consecutive steps had a NaN or infinite loss."""


@dataclass
class Checkpointing:
    directory: Path
    every_steps: int
    keep: int
    on_saved: Callable[[checkpoints.Checkpoint, float, str], None] = lambda checkpoint, seconds, reason: None


def train(engine, stage: Stage, loader: ClipLoader, metrics: TrainMetrics, world: int, *, step: int = 0,
          checkpointing: Checkpointing | None = None, stop_requested: Callable[[], bool] = lambda: False,
          max_nonfinite_steps: int = 3, log_path: Path | None = None, print_every: int = 0) -> TrainSummary:
    """Train from the loader's position to its last epoch; `step` is the global step the loader's position
    corresponds to (0 for a fresh start). Rank 0 passes `log_path` to keep a JSON-lines record of every step."""
    engine.train()
    log = log_path.open("a") if log_path else None
    clips, skipped, in_a_row, loss_value, corrupt_reported = 0, 0, 0, float("nan"), 0
    saved_at, stopping = step, False
    started = time.perf_counter()
    metrics.plan(loader.end_epoch, len(loader))

    def save(reason: str) -> None:
        nonlocal saved_at
        began = time.perf_counter()
        state = loader.state()
        written = checkpoints.save(engine, checkpointing.directory, step, state.epoch + state.position / loader.items,
                                   state, checkpointing.keep)
        seconds = time.perf_counter() - began
        metrics.checkpoint_written(seconds)
        checkpointing.on_saved(written, seconds, reason)
        saved_at = step

    def summary() -> TrainSummary:
        seconds = time.perf_counter() - started
        return TrainSummary(step, clips, skipped, seconds, clips / seconds if seconds > 0 else 0.0, loss_value,
                            stopping)

    try:
        for epoch in range(loader.state().epoch, loader.end_epoch):
            waited_from = time.perf_counter()
            for batch in loader.epoch(epoch):
                ready = time.perf_counter()
                inputs = stage.inputs(batch).to(engine.device, non_blocking=True)
                with autocast(engine.device):
                    outputs = engine(inputs)
                    loss = stage.loss(outputs, batch)
                nonfinite, stop = _agree(loss.total, stop_requested())
                stopping = stopping or stop
                grad_norm = None
                if nonfinite:
                    skipped, in_a_row = skipped + 1, in_a_row + 1
                    metrics.step_skipped()
                    if in_a_row >= max_nonfinite_steps:
                        raise NonFiniteLoss(
                            f"stage {stage.name}: {in_a_row} consecutive steps had a NaN or infinite loss (the last "
                            f"at step {step + 1}); stopping. The last good checkpoint (step {saved_at}) is kept.")
                else:
                    in_a_row = 0
                    engine.backward(loss.total)
                    grad_norm = step_with_grad_norm(engine)
                done = time.perf_counter()
                step += 1
                clips += len(batch.labels) * world
                loss_value = loss.total.item()
                position = loader.state()
                progress = position.epoch + position.position / loader.items
                learning_rate = engine.get_lr()[0]
                metrics.observe_step(len(batch.labels), done - waited_from, ready - waited_from, loss_value,
                                     loss.distillation.item(), learning_rate, progress, grad_norm,
                                     samples=len(batch.samples))
                if len(loader.skipped) > corrupt_reported:
                    metrics.corrupt_samples(len(loader.skipped) - corrupt_reported)
                    corrupt_reported = len(loader.skipped)
                if log:
                    accuracy = (stage.logits(outputs).argmax(1).cpu() == batch.labels).float().mean().item()
                    record = {"step": step, "epoch": round(progress, 4), "loss": loss_value,
                              "cross_entropy": loss.cross_entropy.item(), "distillation": loss.distillation.item(),
                              "accuracy": accuracy, "lr": learning_rate, "grad_norm": grad_norm,
                              "skipped": nonfinite, "step_seconds": done - waited_from,
                              "data_wait_seconds": ready - waited_from,
                              "clips_per_second": len(batch.labels) * world / (done - waited_from)}
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                if print_every and step % print_every == 0:
                    print(f"[{stage.name}] epoch {progress:.2f} step {step} loss {loss_value:.4f} "
                          f"lr {learning_rate:.2e}", flush=True)
                if _window_closed(engine):
                    due = checkpointing is not None and \
                        step // checkpointing.every_steps > saved_at // checkpointing.every_steps
                    if checkpointing and (stopping or due and not in_a_row):  # NaN steps keep the last good one
                        save("signal" if stopping else "periodic")
                    if stopping:
                        return summary()
                waited_from = time.perf_counter()
        if checkpointing and saved_at != step:
            save("end")
    finally:
        if log:
            log.close()
    return summary()


def _window_closed(engine) -> bool:
    """No gradient is partly accumulated: the last applied micro-step closed its accumulation window."""
    return engine.micro_steps % engine.gradient_accumulation_steps() == 0


def _agree(loss: torch.Tensor, stop: bool) -> tuple[bool, bool]:
    """Whether any rank's loss is NaN or infinite, and whether any rank was told to stop."""
    return any_rank(~torch.isfinite(loss.detach()).all(), stop)


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
