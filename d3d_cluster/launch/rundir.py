"""The run directory: the single source of truth for a run (resolved spec, events, stages, results)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from d3d_cluster.files import write_text_atomically
from d3d_cluster.spec import Spec, load_spec

SPEC_NAME = "spec.yaml"
EVENTS_NAME = "events.jsonl"
RESULTS_NAME = "results.json"
SUMMARY_NAME = "summary.json"
TRAIN_LOG_NAME = "train_log.jsonl"  # rank 0's record of every step of a stage


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @classmethod
    def create(cls, spec: Spec) -> "RunDir":
        run = cls(spec.run_dir)
        run.path.mkdir(parents=True, exist_ok=True)
        write_text_atomically(run.path / SPEC_NAME, spec.to_yaml())
        return run

    def spec(self) -> Spec:
        return load_spec(self.path / SPEC_NAME)

    def stage(self, name: str) -> Path:
        path = self.path / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def targets(self) -> Path:
        return self.path / "metrics" / "targets"

    def event(self, event: str, **fields) -> None:
        """Append one line to the events log; a single short write, so concurrent writers do not interleave."""
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "event": event, **fields}
        with open(self.path / EVENTS_NAME, "a") as log:
            log.write(json.dumps(record) + "\n")

    def events(self) -> list[dict]:
        path = self.path / EVENTS_NAME
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


