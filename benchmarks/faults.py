"""A fault soak on a real Slurm cluster: the pipeline (teacher and baseline, the student after the teacher, then
their evaluation) queued as `d3dc submit pipeline` queues it, hit by faults of mixed kinds at steps drawn from a
seed, must end with exactly the weights, per-step losses and scores of the same pipeline left alone.

    .venv/bin/python -m benchmarks.faults --faults 12 --seed 0 --out benchmarks/results/faults.json

It starts its own one-machine Slurm cluster (tests/slurm_cluster.py: munged, slurmctld and slurmd from Debian's
packages, everything under a temporary directory) and stops it at the end. Fault kinds, spread over the three
training stages:
- preemption: `scancel --signal=USR2`; every rank checkpoints, rank 0 requeues, nothing is lost;
- sigterm: `scancel --signal=TERM`, a preemption's grace period: the same path;
- kill_rank: SIGKILL of one rank: the batch script's exit hook requeues, the job resumes from its last periodic
  checkpoint;
- corrupt_checkpoint: the newest checkpoint's largest file overwritten in its middle, then a rank killed: the job
  must pass over it (checksums) and resume from the one before;
- torn_event: half an event appended to events.jsonl without its newline, as a writer killed mid-write leaves it,
  and rank 0 killed: the exit hook, the next start-up and `d3dc status` read across it.
The job is held still (SIGSTOP) while a fault lands, so a fault hits the step it was drawn for. A requeued job is
released at once (`scontrol update StartTime=now`, once its old run has left the node): Slurm would otherwise
hold it for about two minutes, which the latencies below leave out.

Reported per fault: the step it hit, steps lost (steps run again after the resume), and seconds from the fault
to the `requeued` event, to the resumed job's `started` event and to its first new step.
`--smoke`: one fault of each kind on short stages.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from benchmarks import SMOKE_SPEC, parse_args, prepare, write_report
from d3d_cluster.data.schema import Manifest
from d3d_cluster.launch.pipeline import plan_jobs, queue_jobs
from d3d_cluster.launch.status import run_status
from d3d_cluster.rundir import EVENTS_NAME, RESULTS_NAME, SUMMARY_NAME, TRAIN_LOG_NAME, RunDir
from d3d_cluster.spec import Spec
from d3d_cluster.train.checkpoint import CHECKPOINTS, completed
from d3d_cluster.train.curves import read_train_log
from d3d_cluster.train.stages import EXPORT_NAME, STAGES

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from job_control import frozen, release_requeued, signal_pending, slurm_rank_process, wait_until  # noqa: E402
from slurm_cluster import find_programs, start_cluster  # noqa: E402

KINDS = ("preemption", "sigterm", "kill_rank", "corrupt_checkpoint", "torn_event")
SIGNALS = {"preemption": signal.SIGUSR2, "sigterm": signal.SIGTERM}
CHECKPOINT_EVERY = 4
# Steps between two faults of one stage, at least: a resume goes back at most CHECKPOINT_EVERY steps, so the next
# fault always lies ahead of the resumed job.
GAP = CHECKPOINT_EVERY + 4
ENDED_BADLY = ("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE")
WAIT = {"timeout": 600, "poll": 0.05}
SMOKE = {"faults": len(KINDS)}


def draw_faults(count: int, seed: int, steps: int) -> list[dict]:
    """`count` faults: every kind as evenly as the count allows, the stages in turn, and steps drawn one from each
    equal stretch of a stage's [2, steps - 3], so that faults of one stage lie at least GAP apart."""
    rng = random.Random(seed)
    kinds = [KINDS[i % len(KINDS)] for i in range(count)]
    rng.shuffle(kinds)
    faults = [{"kind": kind, "stage": STAGES[i % len(STAGES)]} for i, kind in enumerate(kinds)]
    drawn = []
    for stage in STAGES:
        mine = [fault for fault in faults if fault["stage"] == stage]
        if len(mine) > 1 and mine[0]["kind"] == "corrupt_checkpoint":  # first: no older checkpoint to fall back to
            mine[0], mine[1] = mine[1], mine[0]
        stretch = (steps - 5) / max(1, len(mine))
        for index, fault in enumerate(mine):
            low = 2 + math.ceil(index * stretch)
            if fault["kind"] == "corrupt_checkpoint":
                low = max(low, 2 * CHECKPOINT_EVERY + 1)
            fault["at_step"] = rng.randint(low, max(low, 2 + math.floor((index + 1) * stretch) - GAP))
        drawn += mine
    return drawn


def stage_epochs(faults_per_stage: int, steps_per_epoch: int) -> int:
    """Long enough that each fault's step is drawn from about GAP steps of its own."""
    return max(2, math.ceil((faults_per_stage * 2 * GAP + 5) / steps_per_epoch))


def soak_spec(workdir: Path, name: str, partition: str, epochs: int) -> Spec:
    """The tiny pipeline: the smoke spec's data and clips, frequent checkpoints, a train log line at every step,
    and a crash budget no soak exhausts (the soak measures recovery, not the budget)."""
    return Spec().with_overrides(workdir=str(workdir), name=name, **{
        **SMOKE_SPEC, "teacher.epochs": epochs, "student.epochs": epochs,
        "checkpoint.every_steps": CHECKPOINT_EVERY, "checkpoint.keep": 3, "metrics.report_every_steps": 1,
        "cluster.executor": "slurm", "cluster.partition": partition, "cluster.timeout_min": 30,
        "cluster.max_crash_requeues": 1000})


class Pipeline:
    """One queued pipeline and what it has logged, read from its run directory and Slurm."""

    def __init__(self, spec: Spec, cluster):
        self.cluster = cluster
        self.run = RunDir.create(spec)
        self.job_ids = queue_jobs(self.run, plan_jobs(spec, "pipeline"), echo=lambda line: None)

    def count(self, stage: str, kind: str) -> int:
        return sum(1 for e in self.run.events() if e.get("stage") == stage and e["event"] == kind)

    def finished(self, stage: str) -> bool:
        """Whether the stage has finished: its summary is written just before its `finished` event, and a stat is
        cheap enough for a poll every few milliseconds, which parsing the events log is not."""
        return (self.run.path / stage / SUMMARY_NAME).exists()

    def steps_logged(self, stage: str) -> int:
        log = self.run.path / stage / TRAIN_LOG_NAME
        return log.read_text().count("\n") if log.exists() else 0

    def ranks(self, stage: str) -> list[int]:
        folder = self.run.path / stage / "submitit"
        return [slurm_rank_process(folder, rank) for rank in range(self.run.spec().world_size)]

    def running(self, but: str) -> list[str]:
        """The pipeline's other jobs Slurm runs now (a released job may wait for the node behind them)."""
        running = set(self.cluster.run("squeue", "-h", "-t", "R", "-o", "%i").split())
        return [name for name, job_id in self.job_ids.items() if name != but and job_id in running]

    def check_alive(self) -> None:
        """Raise at once, with what the run recorded, when one of its jobs ended in a way the soak cannot undo."""
        for name, job_id in self.job_ids.items():
            if name in STAGES and self.finished(name):
                continue  # and Slurm forgets a completed job MinJobAge (300 s) after it ends: nothing to ask
            shown = self.cluster.run("scontrol", "-o", "show", "job", job_id)
            state = shown.split("JobState=", 1)[1].split()[0] if "JobState=" in shown else "UNKNOWN"
            if state in ENDED_BADLY:
                raise RuntimeError(f"{name} job {job_id} ended {state}; last events: {self.run.events()[-5:]}")

    def wait_finished(self) -> None:
        eval_id = self.job_ids["eval"]
        wait_until(lambda: self.check_alive() or (self.run.path / RESULTS_NAME).exists()
                   and "JobState=COMPLETED" in self.cluster.run("scontrol", "show", "job", eval_id),
                   "the evaluation job to complete", timeout=3600, poll=1.0)


def inject(pipeline: Pipeline, fault: dict, ranks: list[int], rng: random.Random) -> dict:
    """Hit the stage's running job with `fault`, wait for its requeue, release it, wait for it to resume."""
    stage, kind = fault["stage"], fault["kind"]
    job_id = pipeline.job_ids[stage]
    runs = pipeline.count(stage, "started")
    requeues = pipeline.count(stage, "requeued")
    record = {**fault}
    with frozen(ranks):
        record["hit_step"] = pipeline.steps_logged(stage)
        started = time.monotonic()
        if kind in SIGNALS:
            number = SIGNALS[kind]
            pipeline.cluster.run("scancel", f"--signal={number.name.removeprefix('SIG')}", job_id)
            wait_until(lambda: all(signal_pending(pid, number) for pid in ranks), f"{number.name} to reach the ranks",
                       **WAIT)
        else:
            if kind == "corrupt_checkpoint":
                record["corrupted"] = corrupt_newest_checkpoint(pipeline.run.path / stage / CHECKPOINTS)
            if kind == "torn_event":
                with open(pipeline.run.path / EVENTS_NAME, "ab") as events:
                    events.write(b'{"time": "2026-01-01T00:00:00+0000", "event": "checkpoin')
            victim = 0 if kind == "torn_event" else rng.randrange(len(ranks))
            record["killed_rank"] = victim
            os.kill(ranks[victim], signal.SIGKILL)
    wait_until(lambda: pipeline.count(stage, "requeued") > requeues, f"{stage} to be requeued after {kind}", **WAIT)
    record["to_requeued_s"] = time.monotonic() - started
    release_requeued(pipeline.cluster, job_id)
    record["other_jobs_running_at_release"] = pipeline.running(but=stage)
    wait_until(lambda: pipeline.count(stage, "started") > runs, f"{stage} to start again after {kind}", **WAIT)
    record["to_started_s"] = time.monotonic() - started
    resumed = [e for e in pipeline.run.events() if e.get("stage") == stage and e["event"] == "started"][-1]
    record["resumed_from"] = resumed.get("resumed_from")
    record["steps_lost"] = resumed.get("steps_lost", record["hit_step"])
    resumed_step = resumed.get("step", 0)
    wait_until(lambda: pipeline.steps_logged(stage) > resumed_step, f"{stage}'s first step after resuming",
               **WAIT)
    record["to_first_step_s"] = time.monotonic() - started
    record["requeue_cause"] = [e for e in pipeline.run.events() if e.get("stage") == stage
                               and e["event"] == "requeued"][-1].get("cause")
    return record


def corrupt_newest_checkpoint(directory: Path) -> str | None:
    """Overwrite the middle of the newest complete checkpoint's largest file; its tag (None: no checkpoint yet)."""
    found = completed(directory)
    if not found:
        return None
    newest = found[-1].path
    largest = max((f for f in newest.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    with open(largest, "r+b") as handle:
        handle.seek(largest.stat().st_size // 2)
        handle.write(b"\0corrupt\0" * 8)
    return newest.name


def soak(pipeline: Pipeline, faults: list[dict], seed: int) -> list[dict]:
    """Inject every fault at its stage's drawn step while the pipeline runs: one thread per stage, since a stage
    runs on while another waits out its requeue."""
    records: list[dict] = []
    errors: list[BaseException] = []

    def hit(stage: str, queue: list[dict]) -> None:
        rng = random.Random(f"{seed}-{stage}")
        try:
            for runs, fault in enumerate(queue, 1):
                wait_until(lambda: pipeline.count(stage, "started") >= runs, f"{stage} run {runs} to start",
                           timeout=3600, poll=0.05)
                ranks = pipeline.ranks(stage)
                wait_until(lambda: pipeline.steps_logged(stage) >= fault["at_step"] or errors
                           or pipeline.finished(stage), f"{stage} step {fault['at_step']}", timeout=3600, poll=0.002)
                if errors:
                    return
                if pipeline.finished(stage):
                    raise RuntimeError(f"{stage} finished before its fault at step {fault['at_step']}")
                records.append(inject(pipeline, fault, ranks, rng))
                print(json.dumps(records[-1]), flush=True)
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=hit, args=(stage, [f for f in faults if f["stage"] == stage]), daemon=True)
               for stage in STAGES]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads) and not errors:
        pipeline.check_alive()
        time.sleep(1.0)
    if errors:
        raise errors[0]
    return records


def outcome(run: RunDir) -> dict:
    """What a finished pipeline left: each stage's weights and per-step losses, and the scores."""
    results = json.loads((run.path / RESULTS_NAME).read_text())
    scores = {name: {k: v for k, v in model.items() if k not in ("clips_per_second", "wall_seconds")}
              for name, model in results["models"].items()}
    return {"weights": {stage: torch.load(run.path / stage / EXPORT_NAME, weights_only=True) for stage in STAGES},
            "losses": {stage: [r["loss"] for r in read_train_log(run.path / stage / TRAIN_LOG_NAME)]
                       for stage in STAGES},
            "scores": scores}


def compare(left: dict, right: dict) -> dict:
    weights = {stage: left["weights"][stage].keys() == right["weights"][stage].keys() and all(
        torch.equal(tensor, right["weights"][stage][key]) for key, tensor in left["weights"][stage].items())
        for stage in STAGES}
    return {"weights_identical": weights,
            "losses_identical": {stage: left["losses"][stage] == right["losses"][stage] for stage in STAGES},
            "steps": {stage: len(left["losses"][stage]) for stage in STAGES},
            "scores_identical": left["scores"] == right["scores"]}


def medians(records: list[dict]) -> dict:
    return {key: statistics.median(r[key] for r in records) if records else None
            for key in ("to_requeued_s", "to_started_s", "to_first_step_s")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/d3dc-faults")
    parser.add_argument("--faults", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0, help="draws the faults' kinds, stages, steps and victims")
    parser.add_argument("--out", default="benchmarks/results/faults.json")
    args = parse_args(parser, SMOKE)

    programs, missing = find_programs()
    if missing:
        raise SystemExit(f"the soak needs a Slurm cluster's programs: {', '.join(missing)} are missing "
                         "(bash scripts/setup.sh installs slurm-wlm and munge)")
    workdir = Path(args.workdir)
    stamp = time.strftime("%H%M%S")
    # Not under the workdir: munged's socket path must stay short.
    with tempfile.TemporaryDirectory(prefix="d3dc-slurm-") as root:
        cluster = start_cluster(Path(root), programs)
        os.environ.update(cluster.env)
        try:
            base = soak_spec(workdir, "base", cluster.partition, 2)
            shards = prepare(base)
            steps_per_epoch = Manifest.load(shards).splits["train"].samples // base.deepspeed.global_batch_size
            epochs = stage_epochs(math.ceil(args.faults / len(STAGES)), steps_per_epoch)
            faults = draw_faults(args.faults, args.seed, epochs * steps_per_epoch)

            started = time.monotonic()
            reference = Pipeline(soak_spec(workdir, f"faults-{stamp}-reference", cluster.partition, epochs), cluster)
            reference.wait_finished()
            reference_seconds = time.monotonic() - started

            started = time.monotonic()
            faulted = Pipeline(soak_spec(workdir, f"faults-{stamp}-soak", cluster.partition, epochs), cluster)
            records = soak(faulted, faults, args.seed)
            faulted.wait_finished()
            soak_seconds = time.monotonic() - started
            status = subprocess.run([sys.executable, "-m", "d3d_cluster.cli", "status", str(faulted.run.path)],
                                    capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
            if status.returncode:
                raise RuntimeError(f"d3dc status failed on the faulted run: {status.stderr[-2000:]}")
            requeues = {job.stage: dict(job.requeue_causes) for job in run_status(faulted.run)}
        finally:
            cluster.stop()

    comparison = compare(outcome(faulted.run), outcome(reference.run))
    survived = all(comparison["weights_identical"].values()) and all(comparison["losses_identical"].values()) \
        and comparison["scores_identical"]
    events = faulted.run.events()
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.node()} {platform.machine()}, {len(os.sched_getaffinity(0))} cores, no GPU",
        "setup": {"seed": args.seed, "faults": args.faults, "epochs_per_stage": epochs,
                  "steps_per_stage": epochs * steps_per_epoch, "checkpoint_every_steps": CHECKPOINT_EVERY,
                  "ranks": base.world_size, "stages": list(STAGES)},
        "survived": survived,
        "comparison": comparison,
        "faults_by_kind": {kind: sum(1 for r in records if r["kind"] == kind) for kind in KINDS},
        "requeues_by_cause": {cause: sum(1 for e in events if e["event"] == "requeued" and e.get("cause") == cause)
                              for cause in ("preemption", "time limit", "crash", "slurm")},
        "steps_lost": {kind: [r["steps_lost"] for r in records if r["kind"] == kind] for kind in KINDS},
        "median_seconds": medians(records),
        # A released job that finds the node taken by another stage of the pipeline waits for it.
        "median_seconds_node_free": medians([r for r in records if not r["other_jobs_running_at_release"]]),
        "reference_pipeline_seconds": reference_seconds,
        "soak_pipeline_seconds": soak_seconds,
        "status_requeues_by_stage": requeues,
        "status": status.stdout,
        "faults": records,
    }
    write_report(report, args.out)
    print(json.dumps({key: report[key] for key in ("survived", "comparison", "faults_by_kind", "requeues_by_cause",
                                                   "steps_lost", "median_seconds", "median_seconds_node_free")}, indent=2))
    print(status.stdout)
    if not survived:
        raise SystemExit("the faulted pipeline did not end as the uninterrupted one did: see the comparison")


if __name__ == "__main__":
    main()
