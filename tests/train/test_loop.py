"""The one training loop on a real DeepSpeed engine (CPU, gloo, one rank) reading the tiny shards through DALI."""

import json

import pytest
import torch
from conftest import tiny_spec

from d3d_cluster.data.pipeline import ClipLoader
from d3d_cluster.metrics import TrainMetrics
from d3d_cluster.models import S3DG, FeatureDistillation
from d3d_cluster.train.engine import initialize
from d3d_cluster.train.loop import predict, train
from d3d_cluster.train.stages import Stage, build_network


def test_mixed_5c_distillation_trains_student_and_projection_in_the_engine_in_fp32(tmp_path, tiny_shards, deepspeed_single_rank):
    spec = tiny_spec(tmp_path, data={"shards": str(tiny_shards), "clip_frames": 8, "crop_size": 24, "batch_size": 2},
                     student={"epochs": 1, "distill": {"target": "mixed_5c", "weight": 0.5}})
    torch.manual_seed(0)
    teacher = S3DG(3, in_channels=2, width=0.25).eval().requires_grad_(False)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    stage = Stage("student", "rgb", spec.student, spec.student.distill, teacher)
    network = build_network(spec, spec.student, "rgb", 3)
    trainable = stage.trainable(network)
    assert isinstance(trainable, FeatureDistillation)
    projection_before = trainable.projection.weight.detach().clone()
    student_before = network.base.conv_1a[0][0].weight.detach().clone()

    loader = ClipLoader(tiny_shards, "train", spec.data, modalities=stage.modalities, rank=0, world=1, seed=0,
                        train=True, epochs=1)
    accumulation = spec.deepspeed.global_batch_size // 2
    engine = initialize(trainable, spec.student.optimizer, spec.deepspeed, 2, accumulation, len(loader) // accumulation,
                        len(loader) // accumulation)
    log = tmp_path / "train_log.jsonl"
    summary = train(engine, stage, loader, 1, TrainMetrics("t", "student", 0), world=1, log_path=log)
    loader.close()

    assert summary.steps == len(loader) and torch.isfinite(torch.tensor(summary.final_loss))
    assert all(p.dtype == torch.float32 for p in engine.module.parameters())  # fp32 on CPU
    assert not torch.equal(trainable.projection.weight, projection_before)
    assert not torch.equal(network.base.conv_1a[0][0].weight, student_before)
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
    assert not teacher.training
    assert set(network.state_dict()) == set(S3DG(3, width=0.25).state_dict())  # model.pt stays plain S3D-G
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records[0]["distillation"] > 0
    for record in records:  # top-1 of the step's 2 clips; throughput of the world's clips over the step's time
        assert record["accuracy"] in (0.0, 0.5, 1.0)
        assert record["clips_per_second"] == pytest.approx(2 / record["step_seconds"])

    val = ClipLoader(tiny_shards, "val", spec.data, modalities=("rgb",), rank=0, world=1, seed=0, train=False)
    samples, _, logits, _ = predict(network, "rgb", val, torch.device("cpu"))
    val.close()
    assert logits.shape == (len(samples), 3) and logits.dtype == torch.float32


@pytest.mark.parametrize("compile", [False, True])
def test_compile_flag_reaches_the_engine(deepspeed_single_rank, compile):
    from d3d_cluster.spec import DeepSpeedSpec, OptimizerSpec

    engine = initialize(torch.nn.Linear(4, 2), OptimizerSpec(), DeepSpeedSpec(global_batch_size=2), 2, 1, 10, 10,
                        compile=compile)
    assert engine.is_compiled == compile


def test_engine_forward_runs_in_the_autocast_dtype_it_is_configured_with(deepspeed_single_rank):
    """The GPU path's precision wiring, exercised on the CPU: the engine's own forward autocasts to the dtype
    in its config while the weights stay fp32. (On CUDA, DeepSpeed also turns an outer autocast off inside its
    forward when that section is off; it tests `torch.is_autocast_enabled()`, which is CUDA's, so that half
    cannot be shown here.)"""
    from d3d_cluster.spec import DeepSpeedSpec, OptimizerSpec

    x = torch.randn(2, 3, 2, 4, 4)
    for autocast_to, expected in ((torch.bfloat16, torch.bfloat16), (None, torch.float32)):
        engine = initialize(torch.nn.Conv3d(3, 4, 1), OptimizerSpec(), DeepSpeedSpec(global_batch_size=2), 2, 1, 10,
                            10, autocast_to=autocast_to)
        assert engine(x).dtype == expected
        assert all(p.dtype == torch.float32 for p in engine.module.parameters())
