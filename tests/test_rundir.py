"""The events log survives what a cluster does to it: writers on many nodes appending at once (each waits for the
log's lock, as NFS's lock manager makes writers on other nodes wait), and a line torn by a crash."""

import errno
import fcntl
import json
import multiprocessing
import os
import re
from pathlib import Path

import pytest
from conftest import tiny_spec

from d3d_cluster.launch.requeue import last_run_failures
from d3d_cluster.rundir import EVENTS_NAME, RunDir
from d3d_cluster.launch.status import run_status

WRITERS, EVENTS_EACH = 8, 200


def _append(path: str, writer: int) -> None:
    run = RunDir(path)
    for number in range(EVENTS_EACH):
        # Some events far larger than a stdio buffer (8 KiB), which Python would write in pieces.
        run.event("progress", stage="teacher", job_id=str(writer), number=number, note="x" * (20_000 * (number % 7 == 0)))


def test_events_appended_by_several_processes_at_once_are_all_whole_while_a_reader_reads(tmp_path, capsys):
    run = RunDir.create(tiny_spec(tmp_path))
    writers = [multiprocessing.get_context("fork").Process(target=_append, args=(str(run.path), w))
               for w in range(WRITERS)]
    for writer in writers:
        writer.start()
    while any(writer.is_alive() for writer in writers):
        run.events()  # under its shared lock, a reader never sees a line half written
    assert all(writer.exitcode == 0 for writer in writers)
    assert "damaged" not in capsys.readouterr().err
    events = run.events()
    assert len(events) == WRITERS * EVENTS_EACH
    for writer in range(WRITERS):
        assert [e["number"] for e in events if e["job_id"] == str(writer)] == list(range(EVENTS_EACH))


def _hold_the_lock(path: str, pipe) -> None:
    """A writer on another node, as the lock manager sees it: it holds the log's lock until told to let go."""
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.lockf(descriptor, fcntl.LOCK_EX)
    pipe.send("held")
    pipe.recv()
    os.close(descriptor)


def _waits_for_a_lock(pid: int, path: Path) -> bool:
    """Whether `pid` is queued for a lock on `path`: /proc/locks lists each waiter after "->"."""
    inode = f":{path.stat().st_ino}"
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" in fields and fields[-4] == str(pid) and fields[-3].endswith(inode):
            return True
    return False


def test_an_event_waits_while_another_writer_holds_the_logs_lock(tmp_path):
    run = RunDir.create(tiny_spec(tmp_path))
    log = run.path / EVENTS_NAME
    fork = multiprocessing.get_context("fork")
    ours, theirs = fork.Pipe()
    holder = fork.Process(target=_hold_the_lock, args=(str(log), theirs), daemon=True)
    holder.start()
    assert ours.recv() == "held"
    writer = fork.Process(target=run.event, args=("requeued",), kwargs={"stage": "teacher", "job_id": "7"}, daemon=True)
    writer.start()
    while writer.exitcode is None and not _waits_for_a_lock(writer.pid, log):
        writer.join(0.01)
    assert writer.exitcode is None and log.read_text() == ""  # queued behind the holder, nothing written
    ours.send("let go")
    holder.join()
    writer.join()
    assert writer.exitcode == 0 and [e["event"] for e in run.events()] == ["requeued"]


def test_a_filesystem_without_locks_is_an_error_naming_the_events_log(tmp_path, monkeypatch):
    run = RunDir.create(tiny_spec(tmp_path))

    def no_lock_manager(descriptor, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "lockf", no_lock_manager)  # NFSv3 mounted without its lock daemon
    with pytest.raises(OSError, match=re.escape(f"{run.path / EVENTS_NAME}: cannot lock the events log")):
        run.event("submitted", stage="teacher", job_id="1")


def test_a_line_torn_by_a_crash_is_skipped_and_reported_and_the_next_event_is_whole(tmp_path, capsys):
    run = RunDir.create(tiny_spec(tmp_path))
    run.event("submitted", stage="teacher", job_id="1", executor="local")
    run.event("started", stage="teacher", job_id="1", world_size=2)
    with open(run.path / EVENTS_NAME, "a") as log:  # a writer killed half-way through its line
        log.write(json.dumps({"time": "t", "event": "failed", "stage": "teacher", "job_id": "1"})[:30])
    run.event("failed", stage="teacher", job_id="1", rank=1, host="node7", error="OSError: disk", retryable=True)

    events = run.events()

    assert [e["event"] for e in events] == ["submitted", "started", "failed"]
    assert f"{run.path / EVENTS_NAME}:3: skipping a damaged events line" in capsys.readouterr().err
    assert run.events() == events and capsys.readouterr().err == ""  # reported once, not at every read
    assert [f["host"] for f in last_run_failures(events)] == ["node7"]  # what the requeue hook decides on
    statuses = run_status(run, slurm={})  # and `d3dc status`
    assert [(s.stage, s.last_event) for s in statuses] == [("teacher", "failed")]


def test_a_spec_that_changes_what_a_run_was_trained_on_is_refused_listing_the_changes_unless_forced(tmp_path):
    import pytest

    from d3d_cluster.rundir import SPEC_NAME, SpecChanged

    spec = tiny_spec(tmp_path)
    run = RunDir.create(spec)
    before = (run.path / SPEC_NAME).read_text()
    changed = spec.with_overrides(**{"data.crop_size": 16, "model.width": 0.5, "cluster.tasks_per_node": 1,
                                     "data.reader_threads": 2})
    with pytest.raises(SpecChanged) as refused:
        RunDir.create(changed)
    assert "data.crop_size: 24 -> 16" in str(refused.value) and "model.width: 0.25 -> 0.5" in str(refused.value)
    assert "tasks_per_node" not in str(refused.value) and "reader_threads" not in str(refused.value)
    assert (run.path / SPEC_NAME).read_text() == before  # nothing written

    where = spec.with_overrides(**{"cluster.tasks_per_node": 1, "data.reader_threads": 2})  # how, not what
    assert set(RunDir.create(where).changes) == {"cluster.tasks_per_node", "data.reader_threads"}
    forced = RunDir.create(changed, force=True)
    assert forced.spec() == changed and forced.changes["data.crop_size"] == (24, 16)
    kept = sorted(run.path.glob(f"{SPEC_NAME}.*"))
    assert len(kept) == 2 and kept[0].read_text() == before  # every replaced spec stays beside the new one


def test_a_change_to_a_started_stages_settings_is_refused_naming_the_stage(tmp_path):
    import pytest

    from d3d_cluster.rundir import SpecChanged

    spec = tiny_spec(tmp_path)
    run = RunDir.create(spec)
    stronger = spec.with_overrides(**{"student.distill.weight": 3.0})
    assert spec.student.distill.weight != 3.0
    assert set(RunDir.create(stronger).changes) == {"student.distill.weight"}  # nothing trained with it yet
    run.event("started", stage="student", job_id="1", world_size=2)
    run.event("started", stage="baseline", job_id="2", world_size=2)

    old_value = rf"student.distill.weight: 3.0 -> {spec.student.distill.weight} \(the student started with the old"
    with pytest.raises(SpecChanged, match=old_value):
        RunDir.create(spec)
    with pytest.raises(SpecChanged, match=r"student.epochs: .* \(the baseline and student started with the old"):
        RunDir.create(stronger.with_overrides(**{"student.epochs": 7}))
    teacher_only = stronger.with_overrides(**{"teacher.epochs": 7, "student.distill.precompute": True})
    with pytest.raises(SpecChanged) as refused:  # the student's target changes with its teacher
        RunDir.create(teacher_only)
    assert "teacher.epochs" in str(refused.value) and "precompute" not in str(refused.value)


def test_every_stage_has_the_settings_its_network_is_trained_with():
    """rundir stays importable without torch, so it names the stages again; they must be train.stages' stages, each
    covering the spec section it trains with."""
    from d3d_cluster.rundir import STAGE_SETTINGS, trained_with
    from d3d_cluster.spec import Spec
    from d3d_cluster.train.stages import STAGES, stage_settings

    assert sorted(STAGE_SETTINGS) == sorted(STAGES)
    spec = Spec()
    for stage in STAGES:
        section = "teacher" if stage_settings(spec, stage) is spec.teacher else "student"
        assert f"{section}.epochs" in trained_with(spec, stage)
