"""The run directory: the single source of truth for a run (resolved spec, events, stages, results).

The events log is one JSON line per event, appended by many writers at once (the teacher and the baseline, every
rank of a failing job, exit hooks) from different nodes, usually over NFS, where O_APPEND is not atomic across
clients. So each event is written under an exclusive POSIX lock on the log (`fcntl.lockf`, which NFS serves through
its lock manager) at the end of file read under that lock, and fsynced before the lock is released; readers take a
shared lock, so they never see a line half written. One file rather than one per writer: every reader, and every
tool that reads events.jsonl itself, sees one order, the order the decisions were taken in.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import threading
import time
from pathlib import Path

from d3d_cluster.files import write_text_atomically
from d3d_cluster.spec import Spec, load_spec

SPEC_NAME = "spec.yaml"
EVENTS_NAME = "events.jsonl"
RESULTS_NAME = "results.json"
SUMMARY_NAME = "summary.json"
TRAIN_LOG_NAME = "train_log.jsonl"  # rank 0's record of every step of a stage
STUDY_NAME = "study.json"  # in a study's directory: its points, each a run inside it
TENSORBOARD_NAME = "tb"  # beside the train log: the same records as TensorBoard event files


# What the trained networks and their data are made of: a run whose spec changes any of it would mix stages trained
# on different things. The keys listed as free change how or where, not what, and may change like any other section:
# the clips per rank among them, which follow the number of nodes when the global batch stays (`batch_plan`).
WHAT_IS_TRAINED = ("seed", "prep.", "data.", "model.")
FREE_TO_CHANGE = {"prep.workers", "data.reader_threads", "data.pipelines", "data.eval_clips", "data.eval_crops",
                  "data.batch_size", "model.compile", "student.distill.precompute"}
# What else each stage's training follows: a stage that has started resumes its checkpoints, so changing these under
# it would continue, and report as the new setting's, a network trained with the old one. The baseline is the
# student's recipe without distillation; the student's target is the teacher it was distilled from.
_OPTIMISATION = ("deepspeed.global_batch_size", "deepspeed.gradient_clipping")
STAGE_SETTINGS = {
    "teacher": ("teacher.", *_OPTIMISATION),
    "baseline": ("student.epochs", "student.optimizer.", "student.init.", *_OPTIMISATION),
    "student": ("student.", "teacher.", *_OPTIMISATION),
}


def trained_with(spec: Spec, stage: str) -> dict:
    """The settings, as dotted keys, that a stage's network is the product of: two specs that agree on these train
    the same network from the same seed."""
    prefixes = (*WHAT_IS_TRAINED, *STAGE_SETTINGS[stage])
    return {key: value for key, value in _flat(spec.model_dump()).items()
            if key.startswith(prefixes) and key not in FREE_TO_CHANGE}


# POSIX record locks belong to a process, and closing any descriptor of the file drops them: threads of one process
# take turns at the events log under this lock instead.
_EVENTS_LOG = threading.Lock()
# Damaged events lines already reported by this process, as (path, line number).
_REPORTED_DAMAGE: set[tuple[str, int]] = set()


class SpecChanged(ValueError):
    """Submitting into an existing run with a spec that changes what its stages were trained on."""


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def spec_changes(old: Spec, new: Spec) -> dict[str, tuple]:
    """Every dotted key whose value differs: key -> (old, new)."""
    before, after = _flat(old.model_dump()), _flat(new.model_dump())
    return {key: (before.get(key), after.get(key)) for key in sorted(set(before) | set(after))
            if before.get(key) != after.get(key)}


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.changes: dict[str, tuple] = {}  # what `create` changed in an existing run's spec

    @classmethod
    def create(cls, spec: Spec, force: bool = False) -> "RunDir":
        """The run directory with `spec` as its spec. An existing run keeps its record: a spec that changes what its
        stages were trained on is refused, listing the changes, unless `force`; the spec it replaces is kept beside
        it (spec.yaml.001, .002...), and the changes are in `changes` for the caller to show."""
        run = cls(spec.run_dir)
        stored = run.path / SPEC_NAME
        changes = run.check_spec(spec, force)
        run.path.mkdir(parents=True, exist_ok=True)
        if changes:  # the spec the earlier stages ran with stays beside the new one, numbered in order
            number = len(list(run.path.glob(f"{SPEC_NAME}.*"))) + 1
            write_text_atomically(run.path / f"{SPEC_NAME}.{number:03d}", stored.read_text())
        write_text_atomically(stored, spec.to_yaml())
        run.changes = changes
        return run

    def check_spec(self, spec: Spec, force: bool = False) -> dict[str, tuple]:
        """What `spec` would change in this run's spec, refused as `create` refuses it; nothing is written."""
        stored = self.path / SPEC_NAME
        changes = spec_changes(self.spec(), spec) if stored.is_file() else {}
        started = {event["stage"] for event in self.events() if event["event"] == "started"}
        concerned = {key: [stage for stage in STAGE_SETTINGS
                           if stage in started and key.startswith(STAGE_SETTINGS[stage])]
                     for key in changes if key not in FREE_TO_CHANGE}
        trained = [key for key, stages in concerned.items() if stages or key.startswith(WHAT_IS_TRAINED)]
        if trained and not force:
            lines = "\n".join(f"  {key}: {changes[key][0]!r} -> {changes[key][1]!r}"
                              + (f" (the {' and '.join(concerned[key])} started with the old value)"
                                 if concerned[key] else "") for key in trained)
            raise SpecChanged(f"{stored}: the run {spec.name!r} was made with another spec; these changes would mix "
                              f"stages trained on different data, networks or settings:\n{lines}\npass --force to "
                              "rewrite the run's spec anyway, or give the new spec its own run (--name, or --set "
                              "name=...)")
        return changes

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
        """Append one line to the events log, under an exclusive lock, at the end of file as read under it (taking
        the lock makes an NFS client fetch the file's size afresh), fsynced before the lock is released: writers on
        other nodes wait rather than overwrite the line. A last line left without its newline (a writer killed
        mid-write, a full disk) is closed first, so it damages only itself."""
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "event": event, **fields}
        line = (json.dumps(record) + "\n").encode()
        path = self.path / EVENTS_NAME
        with _EVENTS_LOG:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                _lock(descriptor, fcntl.LOCK_EX, path)
                end = os.fstat(descriptor).st_size
                if end and os.pread(descriptor, 1, end - 1) != b"\n":
                    line = b"\n" + line
                written = 0
                while written < len(line):
                    written += os.pwrite(descriptor, line[written:], end + written)
                os.fsync(descriptor)
            finally:
                os.close(descriptor)  # releases the lock

    def events(self) -> list[dict]:
        """The events in the order they were written. A damaged line (torn by a crash, cut by a full disk) is skipped
        and reported on stderr with its line number: one bad line must not stop status, a stage's start or a requeue
        decision."""
        path = self.path / EVENTS_NAME
        try:
            with _EVENTS_LOG, open(path, "rb") as log:
                _lock(log.fileno(), fcntl.LOCK_SH, path)
                data = log.read()
        except FileNotFoundError:
            return []
        events = []
        for number, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or "event" not in record:
                    raise ValueError("not an event record")
            except ValueError:
                if (str(path), number) not in _REPORTED_DAMAGE:  # a poller would repeat it at every read
                    _REPORTED_DAMAGE.add((str(path), number))
                    print(f"{path}:{number}: skipping a damaged events line: {line[:120]!r}", file=sys.stderr)
                continue
            events.append(record)
        return events


def _lock(descriptor: int, operation: int, path: Path) -> None:
    """Wait for a lock on the whole events log; a filesystem that offers none is an error naming the log."""
    try:
        fcntl.lockf(descriptor, operation)
    except OSError as error:
        raise OSError(error.errno, f"{path}: cannot lock the events log ({error.strerror}); put the run directory on "
                                   "a filesystem with working locks (on NFS: NFSv4, or NFSv3 with lockd)") from error
