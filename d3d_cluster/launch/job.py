"""The jobs every rank runs: a stage's training (`StageJob`) and the evaluation of a run's trained stages
(`EvalJob`).

What submitit pickles is one of these small objects (a run directory and names), never a model or an engine:
everything else is rebuilt from the run directory on the node. This is also the one place below the CLI
that reads the environment (ranks, master address, accelerator).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Rank:
    """Where this process stands in the job's world."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    job_id: str
    master: str


@contextlib.contextmanager
def distributed():
    """The process group of a job's ranks, from Slurm's (or the local executor's) environment: NCCL on GPUs,
    gloo on CPUs."""
    import submitit

    env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    gpu = torch.cuda.is_available()
    if not gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo", verbose=False)
    device = torch.device("cuda", env.local_rank) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
    try:
        yield Rank(env.rank, env.world_size, env.local_rank, device, submitit.JobEnvironment().job_id,
                   f"{env.master_addr}:{env.master_port}")
    finally:
        torch.distributed.destroy_process_group()


@dataclass(frozen=True)
class StageJob:
    run_dir: str
    stage: str

    def __call__(self) -> dict:
        with distributed() as rank:
            return _train_stage(Path(self.run_dir), self.stage, rank)


@dataclass(frozen=True)
class EvalJob:
    """Evaluates the run's trained `stages` on the validation split and writes the run's results."""

    run_dir: str
    stages: tuple[str, ...]

    def __call__(self) -> dict | None:
        with distributed() as rank:
            return _evaluate_run(Path(self.run_dir), self.stages, rank)


def _check_world(spec, run_path: Path, rank: Rank) -> None:
    if rank.world != spec.world_size:
        raise RuntimeError(f"{run_path}: spec expects {spec.world_size} ranks, the job has {rank.world}")
    if rank.device.type == "cpu":
        torch.set_num_threads(spec.cluster.cpus_per_task)


def _train_stage(run_path: Path, stage_name: str, rank: Rank) -> dict:
    from d3d_cluster.data.pipeline import ClipLoader
    from d3d_cluster.data.schema import Manifest
    from d3d_cluster.files import replace_atomically, write_json_atomically
    from d3d_cluster.launch.rundir import SUMMARY_NAME, RunDir
    from d3d_cluster.metrics import (TrainMetrics, bind_address, retire_target, scrape_host, target_path,
                                    targets_dir, write_target)
    from d3d_cluster.train.engine import autocast_dtype, initialize
    from d3d_cluster.train.loop import train
    from d3d_cluster.train.stages import EXPORT_NAME, build_network, build_stage, with_precomputed_teacher

    started = time.time()
    run = RunDir(run_path)
    spec = run.spec()
    _check_world(spec, run_path, rank)
    stage_dir = run.stage(stage_name)
    if rank.rank == 0:
        run.event("started", stage=stage_name, job_id=rank.job_id, world_size=rank.world, master=rank.master)
    torch.manual_seed(spec.seed)
    shards = spec.path(spec.data.shards)
    num_classes = len(Manifest.load(shards).classes)
    stage = build_stage(spec, stage_name, run.path, num_classes, rank.device)
    device_id = rank.device.index if rank.device.type == "cuda" else None

    metrics = TrainMetrics(spec.name, stage_name, rank.rank, job_id=rank.job_id)
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
    try:
        if stage.distill is not None and stage.distill.precompute:
            stage = with_precomputed_teacher(stage, spec, run.path, rank.rank, rank.world, device_id)
        loader = ClipLoader(shards, "train", spec.data, modalities=stage.modalities, train=True,
                            epochs=stage.settings.epochs, rank=rank.rank, world=rank.world, seed=spec.seed,
                            device_id=device_id, skip=stage.unusable_samples)
        network = build_network(spec, stage.settings, stage.modality, num_classes)
        micro_steps = len(loader) * stage.settings.epochs
        engine = initialize(stage.trainable(network).to(rank.device), stage.settings.optimizer, spec.deepspeed,
                            spec.data.batch_size, spec.grad_accumulation, max(1, micro_steps // spec.grad_accumulation),
                            max(1, len(loader) // spec.grad_accumulation), autocast_to=autocast_dtype(rank.device),
                            compile=spec.model.compile)
        summary = train(engine, stage, loader, stage.settings.epochs, metrics, rank.world,
                        log_path=stage_dir / "train_log.jsonl" if rank.rank == 0 else None,
                        print_every=max(1, len(loader) // 2) if rank.rank == 0 else 0)
        loader.close()
        if rank.rank == 0:
            weights = {k: v.float().cpu() for k, v in network.state_dict().items()}
            replace_atomically(stage_dir / EXPORT_NAME, lambda tmp: torch.save(weights, tmp))
            result = {**asdict(summary), "wall_seconds": time.time() - started, "world_size": rank.world,
                      "device": rank.device.type}
            write_json_atomically(stage_dir / SUMMARY_NAME, result)
            run.event("finished", stage=stage_name, job_id=rank.job_id)
            print(f"[{stage_name}] done: {json.dumps(result)}", flush=True)
        torch.distributed.barrier()
        return asdict(summary)
    except BaseException as error:
        if rank.rank == 0:
            run.event("failed", stage=stage_name, job_id=rank.job_id, error=f"{type(error).__name__}: {error}")
        raise
    finally:
        retire_target(target)
        metrics.close()


def _evaluate_run(run_path: Path, stages: tuple[str, ...], rank: Rank) -> dict | None:
    """Every rank evaluates its share of each stage's views; rank 0 writes the predictions and the results."""
    from d3d_cluster.files import write_json_atomically
    from d3d_cluster.launch.rundir import RESULTS_NAME, RunDir
    from d3d_cluster.train.evaluate import evaluate_stage, results_table

    run = RunDir(run_path)
    spec = run.spec()
    _check_world(spec, run_path, rank)
    if rank.rank == 0:
        run.event("started", stage="eval", job_id=rank.job_id, world_size=rank.world, stages=list(stages))
    try:
        for stage in stages:
            predictions = evaluate_stage(spec, run.path, stage, rank.rank, rank.world, rank.device)
            if rank.rank == 0:
                predictions.save(run.stage(stage))
                print(f"[eval] {stage}: top-1 {predictions.top1():.1%} on {len(predictions.keys)} videos", flush=True)
        results = results_table(run.path, stages) if rank.rank == 0 else None
        if rank.rank == 0:
            write_json_atomically(run.path / RESULTS_NAME, results)
            run.event("finished", stage="eval", job_id=rank.job_id)
        torch.distributed.barrier()
        return results
    except BaseException as error:
        if rank.rank == 0:
            run.event("failed", stage="eval", job_id=rank.job_id, error=f"{type(error).__name__}: {error}")
        raise
