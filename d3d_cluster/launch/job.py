"""The jobs every rank runs: a stage's training (`StageJob`) and the evaluation of a run's trained stages
(`EvalJob`).

A stage job is requeueable. Every rank catches the warning signals (USR2, which Slurm sends `signal_delay_s`
before the time limit and some clusters on preemption; SIGTERM, which others send on preemption before a grace
time): the loop then has every rank checkpoint at the next step boundary (a checkpoint is collective; submitit's
own handler would run on rank 0 alone), rank 0 records the event and requeues the job, and the requeued job
resumes from that checkpoint. A job that dies without warning resumes from its last periodic checkpoint (see
`launch.requeue`).

What submitit pickles is one of these small objects (a run directory and names), never a model or an engine:
everything else is rebuilt from the run directory on the node. With `launch.requeue`, this is the one place
below the CLI that reads the environment (ranks, master address, accelerator, job id).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import os
import signal
import socket
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import torch

from d3d_cluster.collectives import barrier
from d3d_cluster.data.pipeline import CorruptStep
from d3d_cluster.launch.devices import DeviceClaim, DevicesSeen, DeviceUnavailable, agree_on_device, compute_device
from d3d_cluster.spec import Spec
from d3d_cluster.train.engine import init_process_group, prepare_device
from d3d_cluster.train.loop import NonFiniteLoss


# Failures a requeue would only repeat: bad input found on the node, a diverged run, a step that does not fit in
# the GPU's memory, a node without the GPUs the spec asks for (or ranks that disagree on theirs). Anything else (a lost
# peer, an NCCL timeout, an I/O error) may go differently next time.
class RequeueBudgetSpent(RuntimeError):
    """Slurm requeued the job itself more often than `cluster.max_crash_requeues` allows."""


NOT_RETRYABLE = (ValueError, FileNotFoundError, KeyError, NonFiniteLoss, CorruptStep, torch.cuda.OutOfMemoryError,
                 DeviceUnavailable, RequeueBudgetSpent)


@dataclass(frozen=True)
class Rank:
    """Where this process stands in the job's world."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    job_id: str
    master: str
    cluster: str  # "slurm" or "local": how the job requeues


def seed_model_randomness(seed: int, rank: int) -> None:
    """After the network is built from `seed` on every rank (the same weights everywhere): each rank its own
    stream for what the model draws while training (dropout), so that ranks do not drop the same units. The
    data views do not use it: they are functions of (seed, epoch, sample)."""
    torch.manual_seed(seed + 1_000_003 * (rank + 1))


@contextlib.contextmanager
def distributed(spec: Spec):
    """The process group of a job's ranks, from Slurm's (or the local executor's) environment: NCCL on GPUs,
    gloo on CPUs, once every rank agrees on which; the rank's device prepared for the spec's precision. submitit
    leaves CUDA_VISIBLE_DEVICES as Slurm (or the local executor) set it: the device follows what each task sees."""
    import submitit

    from d3d_cluster.collectives import rendezvous_store

    env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    timeout = datetime.timedelta(seconds=spec.cluster.collective_timeout_s)
    seen = DevicesSeen.here(spec.cluster)
    try:
        device = compute_device(spec.cluster, env.local_rank, seen)
        claim = DeviceClaim.of(env.rank, seen, device)
    except DeviceUnavailable as refusal:  # shown to the peers first (then raised), so that they fail naming it
        claim = DeviceClaim.refused(env.rank, seen, refusal)
    store = rendezvous_store(env.master_addr, env.master_port, env.rank, env.world_size, timeout)
    agree_on_device(claim, env.world_size, store)
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    prepare_device(device, spec.model.precision)
    init_process_group(device, timeout)  # its rendezvous shares the server of `store`, which is still open
    job = submitit.JobEnvironment()
    try:
        yield Rank(env.rank, env.world_size, env.local_rank, device, job.job_id, f"{env.master_addr}:{env.master_port}",
                   job.cluster)
    finally:
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def failures_recorded(run_path: Path, job_name: str):
    """Whatever ends a rank with an error is recorded in the events log, by that rank, with its rank and host
    and whether a requeue can help (the exit hook reads that). A rank that exits to be requeued or cancelled has
    recorded why itself."""
    try:
        yield
    except SystemExit:
        raise
    except BaseException as error:
        import submitit

        from d3d_cluster.rundir import RunDir

        job = submitit.JobEnvironment()
        RunDir(run_path).event("failed", stage=job_name, job_id=job.job_id, rank=job.global_rank,
                               host=socket.gethostname(), error=f"{type(error).__name__}: {error}",
                               retryable=not isinstance(error, NOT_RETRYABLE))
        raise


@dataclass(frozen=True)
class StageJob:
    run_dir: str
    stage: str

    def __call__(self) -> dict:
        from d3d_cluster.rundir import RunDir

        stop = StopSignals()
        run_path = Path(self.run_dir)
        with failures_recorded(run_path, self.stage), distributed(RunDir(run_path).spec()) as rank:
            summary = _train_stage(run_path, self.stage, rank, stop)
            if summary.stopped:
                from d3d_cluster.launch.requeue import requeue_stopped

                requeue_stopped(run_path, self.stage, rank, stop.received, summary.steps)
            return asdict(summary)


class StopSignals:
    """Remembers the first warning signal; the loop polls it at every step and reports it there. The handler only
    sets the flag: printing from a signal handler can interrupt the rank's own print of a step line and raise
    "reentrant call" inside it."""

    SIGNALS = (signal.SIGUSR2, signal.SIGTERM)

    def __init__(self):
        self.received: str | None = None
        self._reported = False
        for number in self.SIGNALS:  # replaces submitit's handlers, which act on rank 0 only
            signal.signal(number, self._handle)

    def _handle(self, number, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(number).name

    def __call__(self) -> bool:
        if self.received is not None and not self._reported:
            self._reported = True
            print(f"received {self.received}: checkpointing at the next step boundary", flush=True)
        return self.received is not None


@dataclass(frozen=True)
class EvalJob:
    """Evaluates the run's trained `stages` on the validation split and writes the run's results, with the stages
    `reported` from predictions already made (a study's shared stages, evaluated in their own run)."""

    run_dir: str
    stages: tuple[str, ...]
    reported: tuple[str, ...] = ()

    def __call__(self) -> dict | None:
        from d3d_cluster.rundir import RunDir

        run_path = Path(self.run_dir)
        with failures_recorded(run_path, "eval"), distributed(RunDir(run_path).spec()) as rank:
            return _evaluate_run(run_path, self.stages, rank, self.reported)


def _check_world(spec, run_path: Path, rank: Rank) -> None:
    if rank.world != spec.world_size:
        raise RuntimeError(f"{run_path}: spec expects {spec.world_size} ranks, the job has {rank.world}")
    if rank.device.type == "cpu":
        torch.set_num_threads(spec.cluster.cpus_per_task)


def _train_stage(run_path: Path, stage_name: str, rank: Rank, stop: Callable[[], bool]):
    from d3d_cluster.data.pipeline import ClipLoader, training_steps
    from d3d_cluster.data.schema import Manifest
    from d3d_cluster.files import replace_atomically, write_json_atomically
    from d3d_cluster.rundir import SUMMARY_NAME, TRAIN_LOG_NAME, RunDir
    from d3d_cluster.metrics import retire_target
    from d3d_cluster.train import checkpoint as checkpoints
    from d3d_cluster.train.engine import autocast_dtype, initialize
    from d3d_cluster.train.loop import Checkpointing, TrainSummary, train
    from d3d_cluster.train.stages import (EXPORT_NAME, build_network, build_stage, stage_settings,
                                          with_precomputed_teacher)

    started = time.time()
    run = RunDir(run_path)
    spec = run.spec()
    _check_world(spec, run_path, rank)
    stage_dir = run.stage(stage_name)
    checkpoint_dir = stage_dir / checkpoints.CHECKPOINTS
    log_path = stage_dir / TRAIN_LOG_NAME
    resume = checkpoints.choose(checkpoint_dir)
    shards = spec.path(spec.data.shards)
    manifest = Manifest.load(shards)
    epochs = stage_settings(spec, stage_name).epochs
    micro_steps, steps_per_epoch = training_steps(manifest, spec.data, rank.world, epochs)
    finished = stage_dir / SUMMARY_NAME
    # Finished is where the data stands (every epoch read), not a step count: world and batch may change between runs.
    if resume and resume.loader.epoch >= epochs and finished.is_file() and (stage_dir / EXPORT_NAME).is_file():
        kept = json.loads(finished.read_text())  # submitted again after it finished: its network and figures stay
        if rank.rank == 0:
            run.event("finished", stage=stage_name, job_id=rank.job_id)
            print(f"[{stage_name}] already finished at step {resume.step}; kept its network and summary", flush=True)
        return TrainSummary(**{field.name: kept[field.name] for field in fields(TrainSummary)})
    steps_lost = _forget_steps_after(log_path, resume.step if resume else 0) if rank.rank == 0 else 0
    if rank.rank == 0 and rank.cluster == "slurm":
        from d3d_cluster.launch.requeue import count_slurm_requeues

        spent = count_slurm_requeues(run, stage_name, rank.job_id)
        if spent:
            raise RequeueBudgetSpent(spent)
    if rank.rank == 0:
        run.event("started", stage=stage_name, job_id=rank.job_id, world_size=rank.world, master=rank.master,
                  **({"resumed_from": resume.tag, "step": resume.step, "steps_lost": steps_lost,
                     "saved_by_ranks": resume.world_size} if resume else {}))
    torch.manual_seed(spec.seed)  # the network's initial weights: the same on every rank
    num_classes = len(manifest.classes)
    stage = build_stage(spec, stage_name, run.path, num_classes, rank.device)
    device_id = rank.device.index if rank.device.type == "cuda" else None

    metrics, target = _serve_metrics(spec, run, stage_name, rank)
    try:
        if stage.distill is not None and stage.distill.precompute:
            stage = with_precomputed_teacher(stage, spec, run.path, rank.rank, rank.world, device_id)
        loader = ClipLoader(shards, "train", spec.data, modalities=stage.modalities, train=True,
                            epochs=stage.settings.epochs, rank=rank.rank, world=rank.world, seed=spec.seed,
                            device_id=device_id, resume=resume.loader if resume else None,
                            skip=stage.unusable_samples,
                            on_plan=functools.partial(stage.precomputed.prefetch, device=rank.device)
                            if stage.precomputed is not None else None)
        def initialised(report) -> None:
            if rank.rank == 0 and resume is None:  # a resumed stage takes its weights from the checkpoint
                print(f"[{stage_name}] init: {report.summary()}", flush=True)
                run.event("initialised", stage=stage_name, job_id=rank.job_id, **asdict(report))

        network = build_network(spec, stage.settings, stage.modality, num_classes, initialised)
        seed_model_randomness(spec.seed, rank.rank)
        universal = resume is not None and checkpoints.needs_universal(resume, rank.world)
        engine = initialize(stage.trainable(network).to(rank.device), stage.settings.optimizer, spec.deepspeed,
                            spec.data.batch_size, spec.grad_accumulation, max(1, micro_steps // spec.grad_accumulation),
                            max(1, steps_per_epoch // spec.grad_accumulation), autocast_to=autocast_dtype(rank.device),
                            compile=spec.model.compile, load_universal=universal)
        if resume:
            _restore(engine, resume, universal, stage_name, rank)

        def saved(checkpoint, seconds: float, reason: str) -> None:
            if rank.rank == 0:
                run.event("checkpointed", stage=stage_name, job_id=rank.job_id, tag=checkpoint.tag,
                          step=checkpoint.step, epoch=round(checkpoint.epoch, 4), seconds=round(seconds, 3),
                          reason=reason)

        summary = train(engine, stage, loader, metrics, rank.world, step=resume.step if resume else 0,
                        checkpointing=Checkpointing(checkpoint_dir, spec.checkpoint.every_steps, spec.checkpoint.keep,
                                                    saved),
                        stop_requested=stop, max_nonfinite_steps=spec.deepspeed.max_nonfinite_steps,
                        log_path=log_path if rank.rank == 0 else None,
                        print_every=max(1, int(steps_per_epoch // 2)) if rank.rank == 0 else 0,
                        report_every=spec.metrics.report_every_steps)
        loader.close()
        if summary.stopped:
            return summary
        if rank.rank == 0:
            weights = {k: v.float().cpu() for k, v in network.state_dict().items()}
            replace_atomically(stage_dir / EXPORT_NAME, lambda tmp: torch.save(weights, tmp))
            result = {**asdict(summary), "wall_seconds": time.time() - started, "world_size": rank.world,
                      "device": rank.device.type}
            write_json_atomically(stage_dir / SUMMARY_NAME, result)
            run.event("finished", stage=stage_name, job_id=rank.job_id)
            print(f"[{stage_name}] done: {json.dumps(result)}", flush=True)
        barrier()
        return summary
    finally:
        retire_target(target)
        metrics.close()


def _serve_metrics(spec, run, stage_name: str, rank: Rank):
    """This rank's metrics endpoint and its file_sd target; the requeue counters carry the job's totals."""
    from d3d_cluster.launch.requeue import count_events, job_events
    from d3d_cluster.metrics import TrainMetrics, bind_address, scrape_host, target_path, targets_dir, write_target

    metrics = TrainMetrics(spec.name, stage_name, rank.rank, job_id=rank.job_id)
    events = job_events(run, stage_name, rank.job_id)
    metrics.requeued(count_events(events, "requeued"))
    metrics.steps_lost(sum(e.get("steps_lost", 0) for e in events if e["event"] == "started"))
    if rank.device.type == "cuda":
        metrics.watch_gpu(rank.device.index)
    bind = bind_address(spec.metrics, spec.cluster.executor)
    wanted_port = spec.metrics.port + rank.local_rank if spec.metrics.port else 0
    port = metrics.serve(bind, wanted_port)
    if port != wanted_port and wanted_port:
        print(f"[{stage_name}] rank {rank.rank}: metrics port {wanted_port} is taken, serving on {port}", flush=True)
    target = target_path(targets_dir(spec, run), spec.name, stage_name, rank.rank)
    write_target(target, scrape_host(bind), port, metrics.labels)
    print(f"[{stage_name}] rank {rank.rank}/{rank.world} metrics at http://{scrape_host(bind)}:{port}/metrics",
          flush=True)
    return metrics, target


def _restore(engine, resume, universal: bool, stage_name: str, rank: Rank) -> None:
    from d3d_cluster.train import checkpoint as checkpoints

    if universal:
        checkpoints.universal_copy(resume)
    checkpoints.load(engine, resume)
    if rank.rank == 0:
        print(f"[{stage_name}] resumed from {resume.path} (step {resume.step}, epoch {resume.epoch:.2f}, "
              f"saved by {resume.world_size} ranks)", flush=True)


def _forget_steps_after(log_path: Path, step: int) -> int:
    """Drop the step log's records past the checkpoint a job resumes from (they will be run again); how many."""
    from d3d_cluster.files import write_text_atomically

    if not log_path.exists():
        return 0
    lines = log_path.read_text().splitlines()
    kept = [line for line in lines if _logged_step(line) <= step]
    if len(kept) != len(lines):
        write_text_atomically(log_path, "".join(line + "\n" for line in kept))
    return len(lines) - len(kept)


def _logged_step(line: str) -> float:
    """The step of a log record; a record cut short by a kill counts as past any checkpoint."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def _evaluate_run(run_path: Path, stages: tuple[str, ...], rank: Rank, reported: tuple[str, ...] = ()) -> dict | None:
    """Every rank evaluates its share of each stage's views; rank 0 writes the predictions and the results."""
    from d3d_cluster.files import write_json_atomically
    from d3d_cluster.rundir import RESULTS_NAME, RunDir
    from d3d_cluster.train.evaluate import add_results_to_tensorboard, evaluate_stage, results_table

    run = RunDir(run_path)
    spec = run.spec()
    _check_world(spec, run_path, rank)
    if rank.rank == 0:
        run.event("started", stage="eval", job_id=rank.job_id, world_size=rank.world, stages=list(stages))
    for stage in stages:
        predictions = evaluate_stage(spec, run.path, stage, rank.rank, rank.world, rank.device)
        if rank.rank == 0:
            predictions.save(run.stage(stage))
            print(f"[eval] {stage}: top-1 {predictions.top1():.1%} on {len(predictions.keys)} videos"
                  + (f" ({len(predictions.skipped)} not decodable, left out)" if len(predictions.skipped) else ""),
                  flush=True)
    results = results_table(run.path, (*stages, *reported)) if rank.rank == 0 else None
    if rank.rank == 0:
        write_json_atomically(run.path / RESULTS_NAME, results)
        add_results_to_tensorboard(run.path, results, stages)
        run.event("finished", stage="eval", job_id=rank.job_id)
    barrier()
    return results
