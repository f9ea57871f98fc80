"""The run directory: the single source of truth for a run (resolved spec, events, stages, results)."""

from __future__ import annotations

import json
import os
import sys
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
        """Append one line to the events log in one `write` on an O_APPEND descriptor, so that concurrent writers
        (the teacher and the baseline, the ranks' exit hooks) never interleave within a line. A last line left
        without its newline (a writer killed mid-write, a full disk) is closed first, so it damages only itself."""
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "event": event, **fields}
        line = (json.dumps(record) + "\n").encode()
        descriptor = os.open(self.path / EVENTS_NAME, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(descriptor).st_size
            if size and os.pread(descriptor, 1, size - 1) != b"\n":
                line = b"\n" + line
            written = os.write(descriptor, line)
            if written != len(line):
                raise OSError(f"{self.path / EVENTS_NAME}: only {written} of {len(line)} bytes of an event written")
        finally:
            os.close(descriptor)

    def events(self) -> list[dict]:
        """The events in order. A damaged line (torn by a crash, cut by a full disk) is skipped and reported on
        stderr with its line number: one bad line must not stop status, a stage's start or a requeue decision."""
        path = self.path / EVENTS_NAME
        if not path.exists():
            return []
        events = []
        for number, line in enumerate(path.read_bytes().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or "event" not in record:
                    raise ValueError("not an event record")
            except ValueError:
                print(f"{path}:{number}: skipping a damaged events line: {line[:120]!r}", file=sys.stderr)
                continue
            events.append(record)
        return events


