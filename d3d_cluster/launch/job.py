"""The stage job every rank runs: set up distribution, train, evaluate, export.

What submitit pickles is this small object (a run directory and a stage name), never a model or an engine:
everything else is rebuilt from the run directory on the node. This is also the one place below the CLI
that reads the environment (ranks, master address, accelerator).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class StageJob:
    run_dir: str
    stage: str

    def __call__(self) -> dict:
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
            return _run_stage(Path(self.run_dir), self.stage, env.rank, env.world_size, env.local_rank, device,
                              submitit.JobEnvironment().job_id, f"{env.master_addr}:{env.master_port}")
        finally:
            torch.distributed.destroy_process_group()


def _run_stage(run_path: Path, stage_name: str, rank: int, world: int, local_rank: int, device: torch.device,
               job_id: str, master: str) -> dict:
    from d3d_cluster.data.pipeline import ClipLoader
    from d3d_cluster.data.schema import Manifest
    from d3d_cluster.files import replace_atomically, write_json_atomically
    from d3d_cluster.launch.rundir import SUMMARY_NAME, RunDir
    from d3d_cluster.metrics import (TrainMetrics, bind_address, retire_target, scrape_host, target_path,
                                    targets_dir, write_target)
    from d3d_cluster.train.engine import autocast_dtype, initialize
    from d3d_cluster.train.evaluate import gather_predictions
    from d3d_cluster.train.loop import predict, train
    from d3d_cluster.train.stages import EXPORT_NAME, build_network, build_stage

    started = time.time()
    run = RunDir(run_path)
    spec = run.spec()
    if world != spec.world_size:
        raise RuntimeError(f"{run_path}: spec expects {spec.world_size} ranks, the job has {world}")
    stage_dir = run.stage(stage_name)
    if rank == 0:
        run.event("started", stage=stage_name, job_id=job_id, world_size=world, master=master)
    if device.type == "cpu":
        torch.set_num_threads(spec.cluster.cpus_per_task)
    torch.manual_seed(spec.seed)
    shards = spec.path(spec.data.shards)
    manifest = Manifest.load(shards)
    num_classes = len(manifest.classes)
    stage = build_stage(spec, stage_name, run.path, num_classes, device)
    device_id = device.index if device.type == "cuda" else None
    clip = dict(rank=rank, world=world, seed=spec.seed, device_id=device_id)

    metrics = TrainMetrics(spec.name, stage_name, rank, job_id=job_id)
    if device.type == "cuda":
        metrics.watch_gpu(device.index)
    bind = bind_address(spec.metrics, spec.cluster.executor)
    wanted_port = spec.metrics.port + local_rank if spec.metrics.port else 0
    port = metrics.serve(bind, wanted_port)
    if port != wanted_port and wanted_port:
        print(f"[{stage_name}] rank {rank}: metrics port {wanted_port} is taken, serving on {port}", flush=True)
    target = target_path(targets_dir(spec, run), spec.name, stage_name, rank)
    write_target(target, scrape_host(bind), port, metrics.labels)
    print(f"[{stage_name}] rank {rank}/{world} metrics at http://{scrape_host(bind)}:{port}/metrics", flush=True)
    try:
        loader = ClipLoader(shards, "train", spec.data, modalities=stage.modalities, train=True,
                            epochs=stage.settings.epochs, **clip)
        network = build_network(spec, stage.settings, stage.modality, num_classes)
        micro_steps = len(loader) * stage.settings.epochs
        engine = initialize(stage.trainable(network).to(device), stage.settings.optimizer, spec.deepspeed,
                            spec.data.batch_size, spec.grad_accumulation, max(1, micro_steps // spec.grad_accumulation),
                            max(1, len(loader) // spec.grad_accumulation), autocast_to=autocast_dtype(device),
                            compile=spec.model.compile)
        summary = train(engine, stage, loader, stage.settings.epochs, metrics, world,
                        log_path=stage_dir / "train_log.jsonl" if rank == 0 else None,
                        print_every=max(1, len(loader) // 2) if rank == 0 else 0)
        loader.close()

        val = ClipLoader(shards, "val", spec.data, modalities=(stage.modality,), train=False, **clip)
        predictions = gather_predictions(*predict(network, stage.modality, val, device), keys=val.table.keys,
                                         views_per_video=len(val.views), skipped=val.skipped_samples)
        val.close()
        if rank == 0:
            weights = {k: v.float().cpu() for k, v in network.state_dict().items()}
            replace_atomically(stage_dir / EXPORT_NAME, lambda tmp: torch.save(weights, tmp))
            predictions.save(stage_dir)
            result = {**asdict(summary), "top1": predictions.top1(), "wall_seconds": time.time() - started,
                      "world_size": world, "device": device.type}
            write_json_atomically(stage_dir / SUMMARY_NAME, result)
            run.event("finished", stage=stage_name, job_id=job_id, top1=result["top1"])
            print(f"[{stage_name}] done: {json.dumps(result)}", flush=True)
        torch.distributed.barrier()
        return asdict(summary)
    except BaseException as error:
        if rank == 0:
            run.event("failed", stage=stage_name, job_id=job_id, error=f"{type(error).__name__}: {error}")
        raise
    finally:
        retire_target(target)
        metrics.close()
