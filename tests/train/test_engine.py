import copy

import pytest
import torch

from d3d_cluster.spec import DeepSpeedSpec, OptimizerSpec
from d3d_cluster.train.engine import build_optimizer, build_schedule, deepspeed_config, initialize, step_with_grad_norm


def _lrs(settings: OptimizerSpec, total: int, per_epoch: int) -> list[float]:
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(settings, model)
    schedule = build_schedule(settings, optimizer, total, per_epoch)
    rates = []
    for _ in range(total):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return rates


def test_warmup_rises_linearly_then_cosine_decays_towards_zero():
    rates = _lrs(OptimizerSpec(lr=1.0, warmup_epochs=1.0), total=40, per_epoch=4)
    assert rates[:4] == [0.2, 0.4, 0.6, 0.8]
    assert rates[4] == 1.0
    assert all(a >= b for a, b in zip(rates[4:], rates[5:]))
    assert rates[-1] < 0.01


def test_constant_schedule_holds_after_warmup():
    rates = _lrs(OptimizerSpec(lr=0.5, warmup_epochs=0.0, schedule="constant"), total=10, per_epoch=5)
    assert rates == [0.5] * 10


def test_step_schedule_multiplies_the_rate_at_each_decay_epoch_after_warmup():
    rates = _lrs(OptimizerSpec(lr=1.0, warmup_epochs=0.5, schedule="step", decay_epochs=[1, 2], decay_factor=0.1),
                 total=12, per_epoch=4)
    assert rates[:2] == [pytest.approx(1 / 3), pytest.approx(2 / 3)]
    assert rates[2:4] == [1.0, 1.0]
    assert rates[4:8] == [pytest.approx(0.1)] * 4 and rates[8:] == [pytest.approx(0.01)] * 4


def test_sgd_uses_momentum_from_the_spec():
    optimizer = build_optimizer(OptimizerSpec(name="sgd", lr=0.1, momentum=0.8), torch.nn.Linear(2, 2))
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["momentum"] == 0.8


def test_deepspeed_config_keeps_the_global_batch_fixed():
    config = deepspeed_config(DeepSpeedSpec(zero_stage=2, global_batch_size=64), micro_batch=8, accumulation=4)
    assert config["train_batch_size"] == 64
    assert config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"] == 32
    assert config["zero_optimization"] == {"stage": 2}


@pytest.mark.parametrize("zero_stage, optimizer", [(0, "adamw"), (1, "adamw"), (1, "sgd")])
def test_optimizer_steps_report_the_global_grad_norm_before_clipping(zero_stage, optimizer, deepspeed_single_rank):
    """ZeRO-1 with SGD is jobs/kinetics400.yaml's setting: DeepSpeed refused to start it ("untested optimizer")."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    reference = copy.deepcopy(model)
    inputs = [torch.full((2, 4), float(step + 1)) for step in range(4)]
    # The first update sees the gradient of the mean loss over its two micro-steps.
    (sum(reference(x).pow(2).sum() for x in inputs[:2]) / 2).backward()
    expected = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in reference.parameters()])).item()
    engine = initialize(model, OptimizerSpec(name=optimizer),
                        DeepSpeedSpec(zero_stage=zero_stage, global_batch_size=4, gradient_clipping=0.5),
                        micro_batch=2, accumulation=2, optimizer_steps=4, steps_per_epoch=2)
    norms = []
    for x in inputs:
        engine.backward(engine(x).pow(2).sum())
        norms.append(step_with_grad_norm(engine))
    assert norms[0] is None and norms[2] is None
    assert all(torch.is_tensor(norms[i]) and norms[i].shape == () for i in (1, 3))  # left on the device: no host read
    norms = [None if norm is None else norm.item() for norm in norms]
    assert norms[1] == pytest.approx(expected, rel=1e-5) and expected > 0.5  # before clipping to 0.5
    assert norms[3] > 0 and norms[3] != norms[1]


def test_deepspeed_keeps_fp32_weights_and_all_reduces_and_autocasts_only_when_asked():
    fp32 = deepspeed_config(DeepSpeedSpec(), micro_batch=8, accumulation=1)
    bf16 = deepspeed_config(DeepSpeedSpec(), micro_batch=8, accumulation=1, autocast_to=torch.bfloat16)
    for config in (fp32, bf16):
        assert not {"bf16", "fp16"} & set(config)
        assert config["data_types"] == {"grad_accum_dtype": "fp32"}
        assert config["torch_autocast"]["lower_precision_safe_modules"] == []
    assert fp32["torch_autocast"]["enabled"] is False
    assert bf16["torch_autocast"] == {"enabled": True, "dtype": "torch.bfloat16", "lower_precision_safe_modules": []}


def test_autocast_is_bf16_on_cuda_and_fp32_on_cpu():
    from d3d_cluster.train.engine import autocast, autocast_dtype

    assert autocast_dtype(torch.device("cuda", 0)) == torch.bfloat16
    assert autocast_dtype(torch.device("cpu")) is None
    with autocast(torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")


def test_fp32_precision_turns_off_gpu_autocast_for_the_process_and_auto_restores_it():
    from d3d_cluster.train.engine import autocast_dtype, prepare_device

    gpu = torch.device("cuda", 0)
    assert autocast_dtype(gpu, "fp32") is None and autocast_dtype(gpu, "auto") == torch.bfloat16
    try:
        prepare_device(torch.device("cpu"), "fp32")
        assert autocast_dtype(gpu) is None  # what a stage's loop, teacher and evaluation then run in
        assert autocast_dtype(gpu, "auto") == torch.bfloat16  # an explicit precision (d3dc doctor's) wins
    finally:
        prepare_device(torch.device("cpu"), "auto")
    assert autocast_dtype(gpu) == torch.bfloat16


def test_a_cpu_process_group_starts_without_building_any_extension_at_run_time(tmp_path):
    """A run-time C++ build at start costs minutes on a fresh machine and, killed midway, leaves a lock that every
    later job waits at forever: starting a CPU rank must compile nothing."""
    import os
    import subprocess
    import sys

    from d3d_cluster.monitor import free_port

    extensions = tmp_path / "torch_extensions"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions), "DS_ACCELERATOR": "cpu", "RANK": "0",
           "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    started = subprocess.run([sys.executable, "-c", "import datetime, torch; from d3d_cluster.train.engine import "
                              "init_process_group; init_process_group(torch.device('cpu'), datetime.timedelta(60)); "
                              "print(torch.distributed.get_backend())"],
                             env=env, capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, started.stderr[-2000:]
    assert started.stdout.strip().splitlines()[-1] == "gloo"
    assert not extensions.exists() or not any(extensions.rglob("*")), sorted(extensions.rglob("*"))
