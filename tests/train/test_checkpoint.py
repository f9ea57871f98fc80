"""Checkpoints in one process (a one-rank DeepSpeed world): completion marker, checksums, retention, RNG."""

import json
import random

import numpy as np
import pytest
import torch

from d3d_cluster.data.pipeline import LoaderState
from d3d_cluster.spec import DeepSpeedSpec, OptimizerSpec
from d3d_cluster.train import checkpoint as checkpoints
from d3d_cluster.train.engine import initialize

STATE = LoaderState(epoch=1, position=6, seed=0, shards="abc")


def _engine(zero_stage: int = 1):
    torch.manual_seed(0)
    engine = initialize(torch.nn.Linear(4, 2), OptimizerSpec(), DeepSpeedSpec(zero_stage=zero_stage, global_batch_size=2),
                        micro_batch=2, accumulation=1, optimizer_steps=10, steps_per_epoch=5)
    engine.backward(engine(torch.ones(2, 4)).sum())
    engine.step()
    return engine


def test_a_saved_checkpoint_is_complete_with_checksums_and_restores_weights_step_and_rng(tmp_path, deepspeed_single_rank):
    engine = _engine()
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    random.gauss(0, 1)  # leaves a cached second value in Python's state
    saved = checkpoints.save(engine, tmp_path, step=3, epoch=1.5, loader=STATE, keep=2)
    expected_draws = (torch.rand(3), np.random.rand(3), random.gauss(0, 1), random.random())
    weights = {k: v.clone() for k, v in engine.module.state_dict().items()}

    assert saved.tag == "step-00000003" and not (tmp_path / "latest").exists()
    marker = json.loads((saved.path / checkpoints.MARKER).read_text())
    assert marker["step"] == 3 and marker["world_size"] == 1 and marker["zero_stage"] == 1
    assert "rng-rank00000.pt" in marker["files"] and "mp_rank_00_model_states.pt" in marker["files"]

    [found] = checkpoints.completed(tmp_path)
    assert found.loader == STATE and found.epoch == 1.5 and found.problem() is None
    fresh = _engine()
    fresh.backward(fresh(torch.ones(2, 4)).sum())
    fresh.step()
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    checkpoints.load(fresh, checkpoints.latest_valid(tmp_path))
    assert all(torch.equal(v, weights[k]) for k, v in fresh.module.state_dict().items())
    assert fresh.global_steps == engine.global_steps
    draws = (torch.rand(3), np.random.rand(3), random.gauss(0, 1), random.random())
    assert torch.equal(draws[0], expected_draws[0]) and np.array_equal(draws[1], expected_draws[1])
    assert draws[2:] == expected_draws[2:]  # every generator continues where the checkpoint left it
    torch.load(saved.path / "rng-rank00000.pt", weights_only=True)  # plain data: reading it runs no pickled code


def test_a_damaged_checkpoint_is_passed_over_with_a_warning_for_the_previous_one(tmp_path, deepspeed_single_rank):
    engine = _engine()
    checkpoints.save(engine, tmp_path, step=1, epoch=0.5, loader=STATE, keep=3)
    newest = checkpoints.save(engine, tmp_path, step=2, epoch=1.0, loader=STATE, keep=3)
    model_file = newest.path / "mp_rank_00_model_states.pt"
    model_file.write_bytes(model_file.read_bytes()[:100])  # truncated
    with pytest.warns(UserWarning, match="step-00000002 is damaged .*does not match its checksum"):
        assert checkpoints.latest_valid(tmp_path).step == 1


def test_a_save_cut_short_before_its_marker_is_not_a_checkpoint(tmp_path, deepspeed_single_rank):
    engine = _engine()
    checkpoints.save(engine, tmp_path, step=1, epoch=0.5, loader=STATE, keep=3)
    newest = checkpoints.save(engine, tmp_path, step=2, epoch=1.0, loader=STATE, keep=3)
    (newest.path / checkpoints.MARKER).unlink()
    assert [c.step for c in checkpoints.completed(tmp_path)] == [1]


def test_only_the_last_k_complete_checkpoints_are_kept(tmp_path, deepspeed_single_rank):
    engine = _engine()
    for step in range(1, 6):
        checkpoints.save(engine, tmp_path, step=step, epoch=step / 2, loader=STATE, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000004", "step-00000005"]


def test_only_zero_partitioned_checkpoints_need_the_universal_format_on_another_world_size(tmp_path):
    def made(world: int, zero: int):
        return checkpoints.Checkpoint(tmp_path, 1, 0.5, STATE, world, zero, {})

    assert checkpoints.needs_universal(made(2, 1), world=1) and checkpoints.needs_universal(made(2, 2), world=3)
    assert not checkpoints.needs_universal(made(2, 0), world=1) and not checkpoints.needs_universal(made(2, 1), world=2)
