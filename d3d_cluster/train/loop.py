"""The one training loop, for every stage: read a batch, forward, loss, backward, step, report, checkpoint.

Each step makes one all-reduce, after its forward pass, that makes every rank agree on two things: whether any
rank's loss was NaN or infinite (then no rank applies the step, the BatchNorm statistics its forward pass updated
are put back, and the step is counted as skipped), and whether any rank was told to stop (a time limit or
preemption signal). Checkpoints are taken only where a gradient accumulation window has just closed, so that no
partly accumulated gradient is lost and a resumed run takes exactly the steps it would have.

The host reads one value from the device per step: that all-reduced pair of flags, because it decides what the
step does (skip it, or stop and checkpoint) and must be the same on every rank. It is read after the forward pass
and before the backward: a skipped step must not touch the gradients, which accumulate in DeepSpeed's buffers over
a window and cannot be taken back, and DeepSpeed cannot apply a step conditionally on a device value. So on a GPU
the host waits for the forward pass once per step, then queues backward and optimizer step and goes on to the next
batch while the device computes them. Everything else a step reports (losses, accuracy, gradient norm) stays on
the device and is read back every `report_every` steps in one transfer (and at least every 30 s), and before every
checkpoint; the metrics, the train log (one record per step, written in batches) and the printed progress are
brought up to date then. Reading them every step, as `float(loss)` does, made the host wait for the backward pass
and the optimizer step before it could ask for the next batch, and the device wait while it got it. (DeepSpeed's
ZeRO-1/2 step itself still reads the gradient norm on the host at each optimizer step, to detect an overflow.)
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from d3d_cluster.collectives import any_rank
from d3d_cluster.data.pipeline import ClipLoader, to_device
from d3d_cluster.metrics import StepObservation, TrainMetrics
from d3d_cluster.train import checkpoint as checkpoints
from d3d_cluster.train.engine import autocast, step_with_grad_norm
from d3d_cluster.train.stages import Stage
from d3d_cluster.train.step_log import StepLog

# Steps slower than this are reported as they end, whatever `report_every` says: a read per half minute costs nothing,
# and the dashboard and the stall alert (no step for 5 minutes) never wait for several slow steps.
REPORT_AT_LEAST_EVERY_SECONDS = 30.0


@dataclass
class TrainSummary:
    steps: int  # global micro-steps the stage has run, earlier runs of a resumed job included
    clips: int  # clips the whole world trained on in this run
    skipped_steps: int  # steps not applied because a loss was NaN or infinite
    seconds: float  # wall time of the loop, data loading included
    clips_per_second: float  # world throughput
    final_loss: float  # the mean loss of the last epoch's worth of steps this run applied (one step's is noise)
    stopped: bool  # told to stop; with checkpointing, a checkpoint at `steps` holds everything to resume from


class NonFiniteLoss(RuntimeError):
    """Too many consecutive steps had a NaN or infinite loss."""


@dataclass
class Checkpointing:
    directory: Path
    every_steps: int
    keep: int
    on_saved: Callable[[checkpoints.Checkpoint, float, str], None] = lambda checkpoint, seconds, reason: None


class _Step(NamedTuple):
    """A finished step: what the host knows of it, and its figures still on the device (0-d float32 tensors)."""

    step: int
    epoch: float  # epochs done after it
    learning_rate: float
    skipped: bool
    step_seconds: float
    data_wait_seconds: float
    clips: int  # this rank's
    samples: int
    world_clips: int
    loss: torch.Tensor
    cross_entropy: torch.Tensor
    distillation: torch.Tensor
    hits: torch.Tensor | None  # clips whose top-1 class is their label; counted where the train log is kept
    grad_norm: torch.Tensor | None  # when the step updated the weights

    @property
    def on_device(self) -> tuple[torch.Tensor | None, ...]:
        return self.loss, self.cross_entropy, self.distillation, self.hits, self.grad_norm


class StepReports:
    """Finished steps, kept until `flush` reads their device figures back in one transfer; then the metrics take
    them, and rank 0's step log (train log and TensorBoard) gets one record per step (fields as `curves` and
    `d3dc results` read them) and the printed progress its lines, in step order."""

    def __init__(self, metrics: TrainMetrics, log: StepLog | None, stage: str, print_every: int, final_window: int):
        self.metrics, self.log, self.stage, self.print_every = metrics, log, stage, print_every
        self.pending: list[_Step] = []
        self.recent_losses: deque[float] = deque(maxlen=final_window)  # of applied steps
        self.flushed_at = time.perf_counter()

    @property
    def final_loss(self) -> float:
        return sum(self.recent_losses) / len(self.recent_losses) if self.recent_losses else float("nan")

    def add(self, step: _Step) -> None:
        self.pending.append(step)

    @property
    def overdue(self) -> bool:
        return time.perf_counter() - self.flushed_at >= REPORT_AT_LEAST_EVERY_SECONDS

    def flush(self) -> None:
        self.flushed_at = time.perf_counter()
        if not self.pending:
            return
        on_device = [value for step in self.pending for value in step.on_device if value is not None]
        values = iter(torch.stack(on_device).tolist())  # the one transfer
        observed, records = [], []
        for step in self.pending:
            loss, cross_entropy, distillation, hits, grad_norm = (None if value is None else next(values)
                                                                  for value in step.on_device)
            observed.append(StepObservation(step.clips, step.step_seconds, step.data_wait_seconds, loss, distillation,
                                            step.learning_rate, step.epoch, grad_norm, step.samples))
            if self.log:
                records.append({
                    "step": step.step, "epoch": round(step.epoch, 4), "loss": loss, "cross_entropy": cross_entropy,
                    "distillation": distillation, "accuracy": hits / step.clips, "lr": step.learning_rate,
                    "grad_norm": grad_norm, "skipped": step.skipped, "step_seconds": step.step_seconds,
                    "data_wait_seconds": step.data_wait_seconds,
                    "clips_per_second": step.world_clips / step.step_seconds})
            if self.print_every and step.step % self.print_every == 0:
                print(f"[{self.stage}] epoch {step.epoch:.2f} step {step.step} loss {loss:.4f} "
                      f"lr {step.learning_rate:.2e}", flush=True)
            if not step.skipped:
                self.recent_losses.append(loss)
        self.pending = []
        self.metrics.observe_steps(observed)
        if self.log:
            self.log.write(records)


class _Buffers:
    """The trained module's buffers (BatchNorm's running statistics) as they were before a step's forward pass, which
    updates them before the step's loss is known: a skipped step puts them back, so that its NaN or infinite values
    do not reach the exported model. Kept on the buffers' device, one `_foreach_copy_` per dtype each way, no host
    sync."""

    def __init__(self, module: torch.nn.Module):
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for buffer in module.buffers():
            by_dtype.setdefault(buffer.dtype, []).append(buffer)
        self.live = list(by_dtype.values())
        self.kept = [[buffer.clone() for buffer in group] for group in self.live]

    def keep(self) -> None:
        for live, kept in zip(self.live, self.kept):
            torch._foreach_copy_(kept, live)

    def restore(self) -> None:
        for live, kept in zip(self.live, self.kept):
            torch._foreach_copy_(live, kept)


def train(engine, stage: Stage, loader: ClipLoader, metrics: TrainMetrics, world: int, *, step: int = 0,
          checkpointing: Checkpointing | None = None, stop_requested: Callable[[], bool] = lambda: False,
          max_nonfinite_steps: int = 3, log_path: Path | None = None, print_every: int = 0,
          report_every: int = 1) -> TrainSummary:
    """Train from the loader's position to its end; `step` is the global step the loader's position corresponds to
    (0 for a fresh start). Rank 0 passes `log_path` to keep a JSON-lines record of every step, and the same records
    as TensorBoard event files beside it (`step_log`).
    Metrics, log and printed progress are brought up to date every `report_every` steps, before every checkpoint
    and at the end (see the module docstring)."""
    if report_every < 1:
        raise ValueError(f"report_every must be >= 1, got {report_every}")
    engine.train()
    log = StepLog(log_path, resumed_at=step) if log_path else None
    reports = StepReports(metrics, log, stage.name, print_every, final_window=math.ceil(loader.steps_per_epoch))
    buffers = _Buffers(engine.module)
    clips, skipped, in_a_row, corrupt_reported = 0, 0, 0, 0
    saved_at, stopping = step, False
    started = time.perf_counter()
    metrics.plan(loader.end_epoch, loader.steps_per_epoch)

    def save(reason: str) -> None:
        nonlocal saved_at
        reports.flush()  # the log holds every step up to a checkpoint: a resumed run appends to it from there
        began = time.perf_counter()
        state = loader.state()
        written = checkpoints.save(engine, checkpointing.directory, step, state.epoch + state.position / loader.items,
                                   state, checkpointing.keep)
        seconds = time.perf_counter() - began
        metrics.checkpoint_written(seconds)
        checkpointing.on_saved(written, seconds, reason)
        saved_at = step

    def summary() -> TrainSummary:
        reports.flush()
        seconds = time.perf_counter() - started
        return TrainSummary(step, clips, skipped, seconds, clips / seconds if seconds > 0 else 0.0, reports.final_loss,
                            stopping)

    try:
        waited_from = time.perf_counter()
        for batch in loader.batches():
            ready = time.perf_counter()
            batch = batch._replace(labels=to_device(batch.labels, engine.device))
            inputs = stage.inputs(batch).to(engine.device, non_blocking=True)
            buffers.keep()
            with autocast(engine.device):
                outputs = engine(inputs)
                loss = stage.loss(outputs, batch)
            nonfinite, stop = _agree(loss.total, stop_requested())  # the step's one read from the device
            stopping = stopping or stop
            hits = None
            if log:
                hits = (stage.logits(outputs).detach().argmax(1) == batch.labels).sum(dtype=torch.float32)
            figures = loss.total.detach(), loss.cross_entropy.detach(), loss.distillation.detach()
            grad_norm = None
            if nonfinite:
                # A skipped step's graph (every activation its backward would have used) must go before the next
                # forward pass, or the peak memory doubles exactly when a step is skipped.
                del outputs, loss, inputs
                buffers.restore()
                skipped, in_a_row = skipped + 1, in_a_row + 1
                metrics.step_skipped()
                if in_a_row >= max_nonfinite_steps:
                    raise NonFiniteLoss(
                        f"stage {stage.name}: {in_a_row} consecutive steps had a NaN or infinite loss (the last "
                        f"at step {step + 1}); stopping. The last good checkpoint (step {saved_at}) is kept.")
            else:
                in_a_row = 0
                engine.backward(loss.total)
                del outputs, loss, inputs
                grad_norm = step_with_grad_norm(engine)
            done = time.perf_counter()
            step += 1
            size = len(batch.labels)
            clips += size * world
            position = loader.state()
            reports.add(_Step(step, position.epoch + position.position / loader.items, engine.get_lr()[0],
                              nonfinite, done - waited_from, ready - waited_from, size, len(batch.samples),
                              size * world, *figures, hits, grad_norm))
            if step % report_every == 0 or reports.overdue:
                reports.flush()
            if len(loader.skipped) > corrupt_reported:
                metrics.corrupt_samples(len(loader.skipped) - corrupt_reported)
                corrupt_reported = len(loader.skipped)
            # A stop that lands on the last step is not a stop: the stage has finished, and ends as one.
            stopping = stopping and loader.steps_left() > 0
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
        return summary()
    except BaseException:
        with contextlib.suppress(Exception):  # the steps before a failure, as far as they can still be read
            reports.flush()
        raise
    finally:
        if log:
            log.close()


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
