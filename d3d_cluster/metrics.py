"""Prometheus metrics of one training rank, its HTTP endpoint, and the file_sd target that announces it;
and the progress of short dataprep tasks, pushed to a Pushgateway because they may end between two scrapes.

Each rank owns a registry of its own (so tests and several stages in one process never collide) and serves
it on its own port; the target file tells Prometheus where to scrape. Every series carries the labels run,
stage, job_id, node and rank; names follow Prometheus conventions (base units, `_total` counters).
"""

from __future__ import annotations

import errno
import math
import socket
import time
import warnings
from pathlib import Path
from typing import NamedTuple, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, push_to_gateway, start_http_server
from prometheus_client.core import GaugeMetricFamily

from d3d_cluster.files import write_json_atomically
from d3d_cluster.rundir import RunDir
from d3d_cluster.spec import MetricsSpec, Spec

LABELS = ("run", "stage", "job_id", "node", "rank")
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CHECKPOINT_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
ETA_SMOOTHING = 0.1  # weight of the newest step in the moving average of step time behind the ETA


class StepObservation(NamedTuple):
    """One finished micro-step, as `TrainMetrics.observe_steps` takes it."""

    clips: int
    step_seconds: float
    data_wait_seconds: float
    loss: float
    distillation: float
    learning_rate: float
    epoch: float  # epochs done
    grad_norm: float | None = None  # only when the step updated the weights
    samples: int | None = None  # shard samples delivered, when not one per clip


class TrainMetrics:
    """The metrics of one rank of one stage; the recording methods are what the training code calls."""

    def __init__(self, run: str, stage: str, rank: int, job_id: str = "", node: str | None = None,
                 registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.labels = {"run": run, "stage": stage, "job_id": job_id, "node": node or socket.gethostname(),
                       "rank": str(rank)}

        def labelled(kind, name, help, **options):
            return kind(name, help, LABELS, registry=self.registry, **options).labels(**self.labels)

        # Counters and histograms start at zero so that increase() sees their first event.
        self._clips = labelled(Counter, "d3d_train_clips", "Clips the network trained on")
        self._samples = labelled(Counter, "d3d_train_samples",
                                 "Shard samples the loader delivered (one clip each in training)")
        self._steps = labelled(Counter, "d3d_train_steps", "Micro-steps run")
        self._skipped = labelled(Counter, "d3d_train_skipped_steps", "Steps skipped for a NaN or infinite loss")
        self._corrupt = labelled(Counter, "d3d_train_corrupt_samples", "Corrupt samples skipped by the loader")
        self._requeues = labelled(Counter, "d3d_train_requeues",
                                  "Times this job has been requeued (the resumed process reports the job's total)")
        self._lost = labelled(Counter, "d3d_train_steps_lost",
                              "Steps redone after preemption (the resumed process reports the job's total)")
        self._step_time = labelled(Histogram, "d3d_train_step_seconds", "Wall time of a step, data wait included",
                                   buckets=STEP_BUCKETS)
        self._data_wait = labelled(Histogram, "d3d_train_data_wait_seconds", "Time a step waited for its batch",
                                   buckets=STEP_BUCKETS)
        self._checkpoint = labelled(Histogram, "d3d_train_checkpoint_seconds", "Time to write a checkpoint",
                                    buckets=CHECKPOINT_BUCKETS)
        # Gauges are unknown (NaN) until the first step sets them.
        self._clips_per_second = labelled(Gauge, "d3d_train_clips_per_second", "Clips per second over the last step")
        self._loss = labelled(Gauge, "d3d_train_loss", "Total loss of the last step")
        self._distill = labelled(Gauge, "d3d_train_distillation_loss", "Distillation term of the last step")
        self._lr = labelled(Gauge, "d3d_train_learning_rate", "Learning rate of the last step")
        self._grad_norm = labelled(Gauge, "d3d_train_grad_norm",
                                   "Global L2 norm of the gradients before clipping, at the last optimizer step")
        self._epoch = labelled(Gauge, "d3d_train_epoch", "Epochs done (fractional)")
        self._epochs = labelled(Gauge, "d3d_train_epochs", "Epochs this stage trains for")
        self._eta = labelled(Gauge, "d3d_train_eta_seconds", "Estimated seconds until this stage's training ends")
        self._last_step = labelled(Gauge, "d3d_train_last_step_timestamp_seconds",
                                   "Unix time of the last finished step (of the start, before the first)")
        self._last_checkpoint = labelled(Gauge, "d3d_train_last_checkpoint_timestamp_seconds",
                                         "Unix time the last checkpoint was written")
        for gauge in (self._clips_per_second, self._loss, self._distill, self._lr, self._grad_norm, self._epoch,
                      self._epochs, self._eta, self._last_checkpoint):
            gauge.set(math.nan)
        self._last_step.set_to_current_time()
        self._planned_epochs, self._steps_per_epoch = 0, 0
        self._mean_step_seconds = math.nan
        self._server = None

    def plan(self, epochs: int, steps_per_epoch: int) -> None:
        """What the stage will run, for the progress and the ETA."""
        self._epochs.set(epochs)
        self._planned_epochs, self._steps_per_epoch = epochs, steps_per_epoch

    def observe_step(self, clips: int, step_seconds: float, data_wait_seconds: float, loss: float,
                     distillation: float, learning_rate: float, epoch: float, grad_norm: float | None = None,
                     samples: int | None = None) -> None:
        """One finished micro-step; `grad_norm` only when it updated the weights, `epoch` is epochs done."""
        self.observe_steps([StepObservation(clips, step_seconds, data_wait_seconds, loss, distillation, learning_rate,
                                            epoch, grad_norm, samples)])

    def observe_steps(self, steps: Sequence[StepObservation]) -> None:
        """Finished micro-steps, in order, recorded together (the loop reads its figures back every few steps): the
        counters and histograms take every step, the gauges the last one's values."""
        if not steps:
            return
        self._clips.inc(sum(step.clips for step in steps))
        self._samples.inc(sum(step.clips if step.samples is None else step.samples for step in steps))
        self._steps.inc(len(steps))
        mean = self._mean_step_seconds
        for step in steps:
            self._step_time.observe(step.step_seconds)
            self._data_wait.observe(step.data_wait_seconds)
            mean = step.step_seconds if math.isnan(mean) else mean + ETA_SMOOTHING * (step.step_seconds - mean)
        self._mean_step_seconds = mean
        last = steps[-1]
        self._clips_per_second.set(last.clips / last.step_seconds if last.step_seconds > 0 else 0.0)
        self._loss.set(last.loss)
        self._distill.set(last.distillation)
        self._lr.set(last.learning_rate)
        grad_norms = [step.grad_norm for step in steps if step.grad_norm is not None]
        if grad_norms:
            self._grad_norm.set(grad_norms[-1])
        self._epoch.set(last.epoch)
        self._last_step.set_to_current_time()
        if self._steps_per_epoch:
            remaining_steps = max(0.0, self._planned_epochs - last.epoch) * self._steps_per_epoch
            self._eta.set(remaining_steps * self._mean_step_seconds)

    def step_skipped(self) -> None:
        """A step whose loss was NaN or infinite was not applied."""
        self._skipped.inc()

    def corrupt_samples(self, count: int) -> None:
        """The loader skipped `count` samples it could not decode."""
        self._corrupt.inc(count)

    def checkpoint_written(self, seconds: float) -> None:
        self._checkpoint.observe(seconds)
        self._last_checkpoint.set_to_current_time()

    def requeued(self, times: int = 1) -> None:
        """Call once in the resumed process with how often the job has been requeued so far (a new process
        counts from zero, so passing the job's total keeps the series rising across requeues)."""
        self._requeues.inc(times)

    def steps_lost(self, steps: int) -> None:
        """Call once in the resumed process with the steps the job's preemptions have cost so far (steps
        done minus steps checkpointed), for the same reason as `requeued`."""
        self._lost.inc(steps)

    def watch_gpu(self, device_index: int) -> bool:
        """Export the utilisation and memory of this rank's CUDA device; False (and no GPU series) when NVML
        cannot see it."""
        import torch

        uuid = str(torch.cuda.get_device_properties(device_index).uuid)
        try:
            collector = GpuCollector(uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}", self.labels)
        except GpuUnavailable as error:
            warnings.warn(f"no GPU metrics for cuda:{device_index}: {error}", RuntimeWarning, stacklevel=2)
            return False
        self.registry.register(collector)
        return True

    def serve(self, bind: str, port: int) -> int:
        """Start the HTTP endpoint and return the port it bound. Port 0 takes a free one; so does a fixed port
        that is taken (another job on this node): the target file records the port actually bound, so
        Prometheus finds the endpoint either way."""
        try:
            self._server, _ = start_http_server(port, addr=bind, registry=self.registry)
        except OSError as error:
            if port == 0 or error.errno != errno.EADDRINUSE:
                raise OSError(error.errno, f"metrics endpoint on {bind}:{port}: {error.strerror}") from None
            self._server, _ = start_http_server(0, addr=bind, registry=self.registry)
        return self._server.server_address[1]

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class GpuUnavailable(RuntimeError):
    """NVML is missing (no NVIDIA driver: a CPU machine) or does not know the device."""


class GpuCollector:
    """Reads one device through NVML at scrape time, so the figures are as fresh as the scrape."""

    def __init__(self, uuid: str, labels: dict[str, str], nvml=None):
        if nvml is None:
            import pynvml as nvml
        self._nvml = nvml
        try:
            nvml.nvmlInit()
            self._handle = nvml.nvmlDeviceGetHandleByUUID(uuid)
        except nvml.NVMLError as error:
            raise GpuUnavailable(f"NVML: {error}") from None
        self._labels = {**labels, "gpu": uuid}

    def collect(self):
        names, values = list(self._labels), list(self._labels.values())
        try:
            utilization = self._nvml.nvmlDeviceGetUtilizationRates(self._handle)
            memory = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
        except self._nvml.NVMLError:
            return  # a device that stops answering drops out of this scrape instead of failing it
        for name, help, value in (
            ("d3d_gpu_utilization_ratio", "Fraction of the last sample period the GPU was busy", utilization.gpu / 100),
            ("d3d_gpu_memory_used_bytes", "Device memory in use (all processes)", memory.used),
            ("d3d_gpu_memory_total_bytes", "Device memory", memory.total),
        ):
            family = GaugeMetricFamily(name, help, labels=names)
            family.add_metric(values, value)
            yield family


class PrepProgress:
    """Progress of one dataprep task, pushed to a Pushgateway: an array task can end before Prometheus
    scrapes it. Pushes at most every `interval` seconds, and on `finish()`. A gateway that cannot be reached
    costs a warning, never the task."""

    def __init__(self, gateway: str, run: str, task: str | int, videos: int, job_id: str = "",
                 node: str | None = None, interval: float = 5.0):
        self.gateway, self.interval = gateway, interval
        self.grouping = {"run": run, "task": str(task)}
        self.registry = CollectorRegistry()
        names, values = ("job_id", "node"), {"job_id": job_id, "node": node or socket.gethostname()}
        r = self.registry
        self._written = Counter("d3d_prep_videos_written", "Videos written to shards", names, registry=r).labels(**values)
        self._rejected = Counter("d3d_prep_videos_rejected", "Videos rejected (unreadable or too short)", names,
                                 registry=r).labels(**values)
        Gauge("d3d_prep_videos", "Videos this task prepares", names, registry=r).labels(**values).set(videos)
        self._seconds = Gauge("d3d_prep_seconds", "Seconds this task has run", names, registry=r).labels(**values)
        self._started = time.monotonic()
        self._pushed = -math.inf
        self._warned = False

    def record(self, written: int = 0, rejected: int = 0) -> None:
        self._written.inc(written)
        self._rejected.inc(rejected)
        if time.monotonic() - self._pushed >= self.interval:
            self.push()

    def finish(self) -> None:
        self.push()

    def push(self) -> None:
        self._seconds.set(time.monotonic() - self._started)
        self._pushed = time.monotonic()
        try:
            push_to_gateway(self.gateway, job="d3d_prep", registry=self.registry, grouping_key=self.grouping,
                            timeout=5)
        except OSError as error:
            if not self._warned:
                warnings.warn(f"metrics.pushgateway {self.gateway}: cannot push prep progress ({error}); "
                              "the task goes on", RuntimeWarning, stacklevel=2)
                self._warned = True


def bind_address(metrics: MetricsSpec, executor: str) -> str:
    """`metrics.bind`, or when it is null: every interface on a cluster (Prometheus scrapes from another
    host), loopback for local runs."""
    if metrics.bind is not None:
        return metrics.bind
    return "0.0.0.0" if executor == "slurm" else "127.0.0.1"


def scrape_host(bind: str) -> str:
    """The address Prometheus should use for an endpoint bound to `bind`."""
    return socket.gethostname() if bind in ("0.0.0.0", "::", "") else bind


def targets_dir(spec: Spec, run: RunDir) -> Path:
    """Where the run's ranks announce their endpoints: the spec's shared directory, or the run's own."""
    return spec.path(spec.metrics.targets_dir) if spec.metrics.targets_dir else run.targets


def target_path(targets: Path, run: str, stage: str, rank: int) -> Path:
    """One file per rank, named so that runs can share one targets directory (a study point's `/` becomes `+`, which
    no run name holds: every file stays where the file_sd glob looks)."""
    return targets / f"{run.replace('/', '+')}-{stage}-rank{rank}.json"


def write_target(path: Path, host: str, port: int, labels: dict[str, str]) -> None:
    """Announce an endpoint in Prometheus file_sd format, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    host = f"[{host}]" if ":" in host else host
    write_json_atomically(path, [{"targets": [f"{host}:{port}"], "labels": labels}], indent=None)


def retire_target(path: Path) -> None:
    """Prometheus drops a target whose file lists nothing; deleting it can leave a stale target behind."""
    if path.exists():
        write_json_atomically(path, [], indent=None)
