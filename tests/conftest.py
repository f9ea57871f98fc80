"""Shared fixtures: a tiny motion dataset, prepared into shards once per test session by the real dataprep, and
a private one-machine Slurm cluster (tests/slurm_cluster.py) for the session."""

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import pytest

from d3d_cluster.spec import PrepSpec, Spec

TINY = {
    "prep": {
        "synthetic": {"classes": 3, "videos_per_class": 6, "frames": 12, "size": 32, "val_fraction": 0.34},
        "short_side": 32,
        "flow": {"algorithm": "farneback"},
        "shard_samples": 4,
        "workers": 1,
    },
    "data": {"clip_frames": 8, "crop_size": 24, "batch_size": 2},
    "deepspeed": {"global_batch_size": 4},
    # Tests that interrupt a stage at a step watch rank 0's train log for it: it must be written at every step.
    "metrics": {"report_every_steps": 1},
}


def tiny_spec(workdir: Path, **sections) -> Spec:
    """The tiny spec; its cluster runs locally unless `cluster` says otherwise (auto would follow a Slurm cluster
    a test has started)."""
    cluster = {"executor": "local", **sections.pop("cluster", {})}
    tree = {**TINY, **sections, "cluster": cluster, "workdir": str(workdir)}
    return Spec.model_validate(tree)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    from d3d_cluster.launch.prep import prepare_locally

    spec = tiny_spec(tmp_path_factory.mktemp("tiny"))
    prepare_locally(spec, progress=False)
    return spec.path(spec.data.shards)


@pytest.fixture(scope="session")
def shards_of_35(tmp_path_factory) -> Path:
    """A split of 35 training videos: on 2 ranks x 16 clips, an epoch leaves 3 over (the size that crashed)."""
    from d3d_cluster.launch.prep import prepare_locally

    prep = {**TINY["prep"], "synthetic": {**TINY["prep"]["synthetic"], "classes": 5, "videos_per_class": 8,
                                          "val_fraction": 0.125}, "shard_samples": 8}
    spec = tiny_spec(tmp_path_factory.mktemp("thirty-five"), prep=prep)
    prepare_locally(spec, progress=False)
    return spec.path(spec.data.shards)


EVAL_VIEWS = {"eval_clips": 2, "eval_crops": 3}
EVALUATED_STAGES = ("teacher", "student")


def finish_stage(run, stage: str, seed: int, steps: int = 6):
    """What a finished stage job leaves in its directory: model.pt (an fp32 state dict, here of a network with
    random weights and BatchNorm statistics), summary.json and rank 0's train_log.jsonl. The network is returned."""
    import json

    import torch

    from d3d_cluster.data.schema import Manifest
    from d3d_cluster.files import write_json_atomically
    from d3d_cluster.rundir import SUMMARY_NAME, TRAIN_LOG_NAME
    from d3d_cluster.train.stages import EXPORT_NAME, INPUT_CHANNELS, STAGE_INPUT, build_model

    spec = run.spec()
    torch.manual_seed(seed)
    network = build_model(spec.model, STAGE_INPUT[stage], len(Manifest.load(spec.path(spec.data.shards)).classes))
    with torch.no_grad():  # a few training-mode passes give the BatchNorm layers statistics of their own
        for _ in range(2):
            network(torch.randn(4, INPUT_CHANNELS[STAGE_INPUT[stage]], spec.data.clip_frames, spec.data.crop_size,
                                spec.data.crop_size))
    network.eval()
    directory = run.stage(stage)
    torch.save({k: v.float() for k, v in network.state_dict().items()}, directory / EXPORT_NAME)
    write_json_atomically(directory / SUMMARY_NAME, {"steps": steps, "clips_per_second": 10.0 + seed,
                                                     "wall_seconds": 60.0 + seed})
    records = [{"step": step, "loss": 1.0 / step, "accuracy": step / steps, "clips_per_second": 20.0 + seed}
               for step in range(1, steps + 1)]
    (directory / TRAIN_LOG_NAME).write_text("".join(json.dumps(record) + "\n" for record in records))
    return network


@pytest.fixture(scope="session")
def evaluated_run(tmp_path_factory, tiny_shards):
    """A run of the tiny shards whose teacher and student finished (`finish_stage`) and were then evaluated by
    the real evaluation job: 2 local ranks, 2 clips x 3 crops per video, 4 clips per rank per step. The val
    split's 6 videos make 36 views: 4 full global steps of 8 and a last one of 4."""
    from d3d_cluster.launch.pipeline import run_evaluation
    from d3d_cluster.rundir import RunDir

    workdir = tmp_path_factory.mktemp("evaluated")
    spec = tiny_spec(workdir, name="evaluated", data={**TINY["data"], "shards": str(tiny_shards), "batch_size": 4,
                                                      **EVAL_VIEWS},
                     deepspeed={"global_batch_size": 8})
    run = RunDir.create(spec)
    for seed, stage in enumerate(EVALUATED_STAGES):
        finish_stage(run, stage, seed)
    output: list[str] = []
    run_evaluation(run, EVALUATED_STAGES, echo=output.append, poll_seconds=0.2)
    return run, output


def logged_losses(run, stage: str = "teacher") -> list[float]:
    """The per-step losses rank 0 logged for a stage of a run."""
    from d3d_cluster.rundir import TRAIN_LOG_NAME
    from d3d_cluster.train.curves import read_train_log

    return [record["loss"] for record in read_train_log(run.path / stage / TRAIN_LOG_NAME)]


def tensorboard_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in a directory's event files as TensorBoard's own loader shows them (earlier files'
    purged steps left out): tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(directory), size_guidance={"scalars": 0})  # 0: every point, none sampled away
    board.Reload()
    return {tag: [(event.step, event.value) for event in board.Scalars(tag)] for tag in board.Tags()["scalars"]}


def assert_tensorboard_shows_the_train_log(stage_dir: Path) -> None:
    """The stage's tb/ holds every field of every train log record as `train/FIELD` at the record's step, in float32
    as TensorBoard stores scalars, and nothing else."""
    from d3d_cluster.rundir import TENSORBOARD_NAME, TRAIN_LOG_NAME
    from d3d_cluster.train.curves import read_train_log

    expected: dict[str, list[tuple[int, float]]] = {}
    for record in read_train_log(stage_dir / TRAIN_LOG_NAME):
        for field, value in record.items():
            if field != "step" and value is not None:
                expected.setdefault(f"train/{field}", []).append((record["step"], value))
    shown = {tag: points for tag, points in tensorboard_scalars(stage_dir / TENSORBOARD_NAME).items()
             if tag.startswith("train/")}
    assert set(shown) == set(expected)
    for tag, points in expected.items():
        assert [step for step, _ in shown[tag]] == [step for step, _ in points], tag
        np.testing.assert_array_equal([value for _, value in shown[tag]],
                                      np.float32([value for _, value in points]), err_msg=tag)


def require(missing: str | None) -> None:
    """Skip a test whose external service cannot run here, with the reason; with CI=true fail instead: CI must
    run every test."""
    if missing is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(missing)
    pytest.skip(missing)


def _slurm_programs() -> dict[str, str]:
    from slurm_cluster import find_programs

    programs, missing = find_programs()
    require(f"a test Slurm cluster needs {', '.join(missing)} (bash scripts/setup.sh installs slurm-wlm and munge)"
            if missing else None)
    return programs


@contextmanager
def running_cluster(nodes: int = 1):
    """A private Slurm cluster, reached through SLURM_CONF (set for this process and its children meanwhile)."""
    from slurm_cluster import start_cluster

    programs = _slurm_programs()
    # Not pytest's tmp_path: munged's socket path must stay short.
    with tempfile.TemporaryDirectory(prefix="d3dc-slurm-") as root:
        cluster = start_cluster(Path(root), programs, nodes=nodes)
        try:
            with pytest.MonkeyPatch.context() as patch:
                for name, value in cluster.env.items():
                    patch.setenv(name, value)
                yield cluster
        finally:
            cluster.stop()


@pytest.fixture(scope="session")
def slurm_cluster():
    """One node (this host) for the session."""
    with running_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def two_node_slurm_cluster():
    """Two nodes, each slurmd in its own network namespace with its own address (tests/netns.py)."""
    from netns import unavailable

    require(unavailable())
    with running_cluster(nodes=2) as cluster:
        yield cluster


def require_binary(name: str) -> str:
    """The path of a service binary the test needs (failing under CI, skipping elsewhere, when it is missing)."""
    import shutil

    path = shutil.which(name)
    require(None if path else f"{name} is not installed: `bash scripts/setup.sh` installs it")
    return path


@pytest.fixture
def promtool() -> str:
    return require_binary("promtool")


@pytest.fixture
def prometheus_installed() -> None:
    require_binary("prometheus")


@pytest.fixture
def pushgateway(tmp_path) -> str:
    """A real Prometheus Pushgateway on a free loopback port; its URL."""
    import subprocess
    import time
    import urllib.request

    from d3d_cluster.monitor import free_port

    binary = require_binary("prometheus-pushgateway")
    url = f"http://127.0.0.1:{free_port()}"
    log = (tmp_path / "pushgateway.log").open("w")
    process = subprocess.Popen([binary, f"--web.listen-address={url[len('http://'):]}"], stdout=log,
                               stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"{url}/-/ready", timeout=1)
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"pushgateway did not start: {(tmp_path / 'pushgateway.log').read_text()}")
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=20)
        log.close()


SINGLE_RANK = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")


@pytest.fixture(scope="session")
def _single_rank_group():
    """One gloo process group per session: DeepSpeed caches its groups, so a second init in one process fails."""
    import torch

    from d3d_cluster.monitor import free_port

    with pytest.MonkeyPatch.context() as patch:
        for key, value in {**SINGLE_RANK, "MASTER_PORT": str(free_port())}.items():
            patch.setenv(key, value)
        patch.setenv("DS_ACCELERATOR", os.environ.get("DS_ACCELERATOR", "cpu"))
        from datetime import timedelta

        from d3d_cluster.train.engine import init_process_group

        init_process_group(torch.device("cpu"), timedelta(minutes=30))
    yield
    torch.distributed.destroy_process_group()


@pytest.fixture
def deepspeed_single_rank(_single_rank_group, monkeypatch):
    """A one-rank world for tests that build a real DeepSpeed engine in this process. The rank variables are
    set for the test only: left set, they would leak into the stage jobs later tests start (submitit refuses
    to export over them)."""
    for key, value in {**SINGLE_RANK, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}.items():
        monkeypatch.setenv(key, value)


# Dataprep: tiny real videos, written where a dataset's layout puts them.

def write_tiny_video(path: Path, frames: int = 8, size: tuple[int, int] = (32, 32), seed: int = 0) -> Path:
    """A texture drifting right by 1 px per frame: an H.264 video of `frames` frames at 25 fps."""
    from dataprep.video import write_h264  # PyAV: not on the GPU machine, which runs tests/gpu with this file

    rng = np.random.default_rng(seed)
    height, width = size
    texture = cv2.resize(rng.random((8, 8, 3)), (width + frames, height), interpolation=cv2.INTER_CUBIC)
    video = np.stack([texture[:, frames - i : frames - i + width] for i in range(frames)])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_h264(path, np.clip(video * 255, 0, 255).astype(np.uint8), 25)
    return path


@pytest.fixture
def tiny_video():
    return write_tiny_video


@pytest.fixture
def small_prep():
    """Settings that prepare a tiny video in well under a second: Farneback flow, 32 px, 4 videos a shard."""
    def make(**fields) -> PrepSpec:
        return PrepSpec(**{"short_side": 32, "flow": {"algorithm": "farneback"}, "shard_samples": 4, "workers": 1, **fields})
    return make
