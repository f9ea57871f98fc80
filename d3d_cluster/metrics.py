"""Prometheus metrics of one training rank, its HTTP endpoint, and the file_sd target that announces it.

Each rank owns a registry of its own (so tests and several stages in one process never collide) and serves
it on its own port; the target file under the run directory tells Prometheus where to scrape.
"""

from __future__ import annotations

import socket
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from d3d_cluster.files import write_json_atomically

LABELS = ("run", "stage", "rank")
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class TrainMetrics:
    def __init__(self, run: str, stage: str, rank: int, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.labels = {"run": run, "stage": stage, "rank": str(rank)}
        r, names = self.registry, LABELS
        self._clips = Counter("d3d_train_clips", "Training clips processed", names, registry=r)
        self._steps = Counter("d3d_train_steps", "Micro-steps run", names, registry=r)
        self._clips_per_second = Gauge("d3d_train_clips_per_second", "Clips per second over the last step", names, registry=r)
        self._loss = Gauge("d3d_train_loss", "Total loss of the last step", names, registry=r)
        self._distill = Gauge("d3d_train_distillation_loss", "Distillation term of the last step", names, registry=r)
        self._lr = Gauge("d3d_train_learning_rate", "Learning rate", names, registry=r)
        self._epoch = Gauge("d3d_train_epoch", "Current epoch (fractional)", names, registry=r)
        self._step_time = Histogram("d3d_train_step_seconds", "Wall time of a step, data wait included", names,
                                    buckets=STEP_BUCKETS, registry=r)
        self._data_wait = Histogram("d3d_train_data_wait_seconds", "Time a step waited for its batch", names,
                                    buckets=STEP_BUCKETS, registry=r)
        self._server = None

    def observe_step(self, clips: int, step_seconds: float, data_wait_seconds: float, loss: float,
                     distillation: float, learning_rate: float, epoch: float) -> None:
        labels = self.labels
        self._clips.labels(**labels).inc(clips)
        self._steps.labels(**labels).inc()
        self._clips_per_second.labels(**labels).set(clips / step_seconds if step_seconds > 0 else 0.0)
        self._loss.labels(**labels).set(loss)
        self._distill.labels(**labels).set(distillation)
        self._lr.labels(**labels).set(learning_rate)
        self._epoch.labels(**labels).set(epoch)
        self._step_time.labels(**labels).observe(step_seconds)
        self._data_wait.labels(**labels).observe(data_wait_seconds)

    def serve(self, bind: str, port: int) -> int:
        """Start the HTTP endpoint; port 0 takes a free one. Returns the bound port."""
        self._server, _ = start_http_server(port, addr=bind, registry=self.registry)
        return self._server.server_address[1]

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def scrape_host(bind: str) -> str:
    """The address Prometheus should use for an endpoint bound to `bind`."""
    return socket.gethostname() if bind in ("0.0.0.0", "::", "") else bind


def write_target(path: Path, host: str, port: int, labels: dict[str, str]) -> None:
    """Announce an endpoint in Prometheus file_sd format, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(path, [{"targets": [f"{host}:{port}"], "labels": labels}], indent=None)


def retire_target(path: Path) -> None:
    """Prometheus drops a target whose file lists nothing; deleting it can leave a stale target behind."""
    if path.exists():
        write_json_atomically(path, [], indent=None)
