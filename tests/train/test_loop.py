"""The one training loop on a real DeepSpeed engine (CPU, gloo, one rank) reading the tiny shards through DALI."""

import json
import weakref

import pytest
import torch
from conftest import assert_tensorboard_shows_the_train_log, tiny_spec

from d3d_cluster.data.pipeline import ClipLoader
from d3d_cluster.metrics import TrainMetrics
from d3d_cluster.models import S3DG, FeatureDistillation
from d3d_cluster.train import checkpoint as checkpoints
from d3d_cluster.train.engine import initialize
from d3d_cluster.train.loop import Checkpointing, NonFiniteLoss, predict, train
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
    steps = loader.steps_left()
    engine = initialize(trainable, spec.student.optimizer, spec.deepspeed, 2, accumulation, steps // accumulation,
                        steps // accumulation)
    log = tmp_path / "train_log.jsonl"
    summary = train(engine, stage, loader, TrainMetrics("t", "student", 0), world=1, log_path=log)
    loader.close()

    assert summary.steps == steps and torch.isfinite(torch.tensor(summary.final_loss))
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


class PoisonedStage(Stage):
    """The teacher stage, with a NaN loss at the given calls (counted from 1)."""

    def __init__(self, spec, poisoned: set[int]):
        super().__init__("teacher", "flow", spec.teacher)
        self.poisoned, self.calls = poisoned, 0

    def loss(self, outputs, batch):
        self.calls += 1
        loss = super().loss(outputs, batch)
        if self.calls in self.poisoned:
            loss = loss._replace(total=loss.total * float("nan"))
        return loss


def _teacher_run(tmp_path, tiny_shards, poisoned: set[int], epochs: int = 2):
    spec = tiny_spec(tmp_path, data={"shards": str(tiny_shards), "clip_frames": 8, "crop_size": 24, "batch_size": 2},
                     teacher={"epochs": epochs}, deepspeed={"global_batch_size": 2, "max_nonfinite_steps": 2},
                     cluster={"tasks_per_node": 1})
    torch.manual_seed(0)
    network = build_network(spec, spec.teacher, "flow", 3)
    loader = ClipLoader(tiny_shards, "train", spec.data, modalities=("flow",), rank=0, world=1, seed=0, train=True,
                        epochs=epochs)
    engine = initialize(network, spec.teacher.optimizer, spec.deepspeed, 2, 1, loader.steps_left(),
                        loader.steps_per_epoch)
    metrics = TrainMetrics("t", "teacher", 0)
    log = tmp_path / "train_log.jsonl"
    return spec, network, loader, engine, metrics, log, PoisonedStage(spec, poisoned)


def test_a_nan_loss_skips_its_step_on_every_rank_and_is_counted(tmp_path, tiny_shards, deepspeed_single_rank):
    spec, network, loader, engine, metrics, log, stage = _teacher_run(tmp_path, tiny_shards, poisoned={2})
    weights = []
    original_step = engine.step

    def step_recording_weights():
        original_step()
        weights.append(network.base.conv_1a[0][0].weight.detach().clone())

    engine.step = step_recording_weights
    planned = loader.steps_left()
    summary = train(engine, stage, loader, metrics, world=1, log_path=log)
    loader.close()
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert summary.skipped_steps == 1 and summary.steps == len(records) == planned
    assert [r["skipped"] for r in records[:3]] == [False, True, False]
    assert len(weights) == summary.steps - 1  # the poisoned step updated nothing
    assert all(torch.isfinite(w).all() for w in weights)
    assert metrics.registry.get_sample_value("d3d_train_skipped_steps_total", metrics.labels) == 1
    assert_tensorboard_shows_the_train_log(tmp_path)  # the skipped step's NaN loss too, without a gradient norm


class InfiniteInputStage(Stage):
    """The teacher stage, with one infinite value in the clips of the given call (counted from 1)."""

    def __init__(self, spec, at: int):
        super().__init__("teacher", "flow", spec.teacher)
        self.at, self.calls = at, 0

    def inputs(self, batch):
        self.calls += 1
        clips = super().inputs(batch)
        if self.calls == self.at:
            clips = clips.clone()
            clips.view(-1)[0] = float("inf")
        return clips


class LeavingOut:
    """The loader without its `left_out`-th batch (counted from 1): a run in which that step never happened."""

    def __init__(self, loader: ClipLoader, left_out: int):
        self.loader, self.left_out = loader, left_out

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def batches(self):
        for count, batch in enumerate(self.loader.batches(), 1):
            if count != self.left_out:
                yield batch


def test_a_skipped_nonfinite_step_leaves_batchnorm_running_statistics_as_they_were(tmp_path, tiny_shards,
                                                                                    deepspeed_single_rank):
    clean = torch.randn(2, 2, 8, 24, 24, generator=torch.Generator().manual_seed(1))
    states, logits = {}, {}
    for run in ("infinite", "left_out"):
        (tmp_path / run).mkdir()
        spec, network, loader, engine, metrics, _, _ = _teacher_run(tmp_path / run, tiny_shards, set(), epochs=1)
        if run == "infinite":
            summary = train(engine, InfiniteInputStage(spec, at=2), loader, metrics, world=1)
        else:
            summary = train(engine, Stage("teacher", "flow", spec.teacher), LeavingOut(loader, 2), metrics, world=1)
        loader.close()
        assert summary.skipped_steps == (run == "infinite")
        states[run] = network.state_dict()
        with torch.no_grad():
            logits[run] = network.eval()(clean)
    assert torch.isfinite(logits["infinite"]).all()
    assert torch.equal(logits["infinite"], logits["left_out"])
    assert all(torch.equal(value, states["left_out"][key]) for key, value in states["infinite"].items())


def test_nan_losses_in_a_row_stop_the_stage_and_keep_the_last_good_checkpoint(tmp_path, tiny_shards,
                                                                             deepspeed_single_rank):
    spec, network, loader, engine, metrics, log, stage = _teacher_run(tmp_path, tiny_shards, poisoned={4, 5})
    directory = tmp_path / "checkpoints"
    with pytest.raises(NonFiniteLoss, match=r"2 consecutive steps had a NaN or infinite loss \(the last at step 5\)"
                                            r".*last good checkpoint \(step 2\) is kept"):
        train(engine, stage, loader, metrics, world=1, checkpointing=Checkpointing(directory, 2, 3),
              max_nonfinite_steps=spec.deepspeed.max_nonfinite_steps)
    loader.close()
    assert [c.step for c in checkpoints.completed(directory)] == [2]
    assert checkpoints.latest_valid(directory).problem() is None


def test_a_stop_request_without_checkpointing_ends_the_loop_at_the_next_step(tmp_path, tiny_shards,
                                                                            deepspeed_single_rank):
    spec, network, loader, engine, metrics, log, stage = _teacher_run(tmp_path, tiny_shards, poisoned=set())
    polls = []

    def stop_requested() -> bool:  # asked once a step
        polls.append(True)
        return len(polls) == 3

    planned = loader.steps_left()
    summary = train(engine, stage, loader, metrics, world=1, stop_requested=stop_requested, log_path=log)
    loader.close()
    assert summary.stopped and summary.steps == 3 < planned
    assert len(log.read_text().splitlines()) == 3


TIMINGS = ("step_seconds", "data_wait_seconds", "clips_per_second")


def _logged(log) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in log.read_text().splitlines()]


def test_figures_read_back_every_few_steps_give_the_log_and_metrics_of_reading_every_step(tmp_path, tiny_shards,
                                                                                         deepspeed_single_rank):
    runs = {}
    for every in (1, 4):
        (tmp_path / str(every)).mkdir()
        spec, network, loader, engine, metrics, log, stage = _teacher_run(tmp_path / str(every), tiny_shards,
                                                                          poisoned={3})
        lines_at_poll = []

        def stop_requested() -> bool:  # asked once a step, before the step is reported
            lines_at_poll.append(len(log.read_text().splitlines()) if log.exists() else 0)
            return False

        planned = loader.steps_left()
        summary = train(engine, stage, loader, metrics, world=1, log_path=log, stop_requested=stop_requested,
                        report_every=every)
        loader.close()
        runs[every] = summary, _logged(log), metrics, lines_at_poll
    (summary_1, records_1, metrics_1, _), (summary_4, records_4, metrics_4, polls_4) = runs[1], runs[4]
    assert records_4 == records_1 and len(records_4) == summary_4.steps == planned
    assert records_4[2]["skipped"] and records_4[2]["loss"] != records_4[2]["loss"]  # NaN, as logged every step
    assert [r["grad_norm"] is None for r in records_4] == [r["skipped"] for r in records_4]
    last_epoch = [r["loss"] for r in records_4 if not r["skipped"]][-6:]  # 12 videos, 2 a step: 6 steps an epoch
    assert summary_4.final_loss == summary_1.final_loss == pytest.approx(sum(last_epoch) / 6)
    # Written four steps at a time: during step k the log holds the steps of the last full group of four.
    assert polls_4 == [(k - 1) // 4 * 4 for k in range(1, summary_4.steps + 1)]
    for name in ("d3d_train_steps_total", "d3d_train_clips_total", "d3d_train_loss", "d3d_train_grad_norm",
                 "d3d_train_epoch", "d3d_train_step_seconds_count", "d3d_train_skipped_steps_total"):
        assert metrics_4.registry.get_sample_value(name, metrics_4.labels) == \
            metrics_1.registry.get_sample_value(name, metrics_1.labels), name


def test_a_checkpoint_finds_every_step_before_it_in_the_log_whatever_the_report_interval(tmp_path, tiny_shards,
                                                                                          deepspeed_single_rank):
    spec, network, loader, engine, metrics, log, stage = _teacher_run(tmp_path, tiny_shards, poisoned=set())
    at_save = []

    def saved(checkpoint, seconds, reason):
        at_save.append((checkpoint.step, reason, len(log.read_text().splitlines())))

    polls = []

    def stop_requested() -> bool:
        polls.append(True)
        return len(polls) == 7

    summary = train(engine, stage, loader, metrics, world=1, log_path=log, stop_requested=stop_requested,
                    checkpointing=Checkpointing(tmp_path / "checkpoints", 3, 5, saved), report_every=100)
    loader.close()
    assert summary.stopped and summary.steps == 7
    assert at_save == [(3, "periodic", 3), (6, "periodic", 6), (7, "signal", 7)]
    assert [r["step"] for r in _logged(log)] == list(range(1, 8))


def test_nan_losses_in_a_row_leave_the_steps_before_the_last_in_the_log(tmp_path, tiny_shards, deepspeed_single_rank):
    spec, network, loader, engine, metrics, log, stage = _teacher_run(tmp_path, tiny_shards, poisoned={4, 5})
    with pytest.raises(NonFiniteLoss, match="the last at step 5"):
        train(engine, stage, loader, metrics, world=1, log_path=log, report_every=10,
              max_nonfinite_steps=spec.deepspeed.max_nonfinite_steps)
    loader.close()
    assert [r["skipped"] for r in _logged(log)] == [False, False, False, True]  # read back before the error rose


def test_a_skipped_steps_activations_are_freed_before_the_next_forward_pass(tmp_path, tiny_shards,
                                                                            deepspeed_single_rank):
    """A skipped step runs no backward, so its graph (every activation it saved) would live on through the next
    forward pass and double the peak memory exactly when a step is skipped."""
    spec, network, loader, engine, metrics, _, stage = _teacher_run(tmp_path, tiny_shards, poisoned={2}, epochs=1)
    saved, alive_at_forward = [], []
    first_conv = network.base.conv_1a[0][0]  # its output is saved by the BatchNorm after it for the backward pass
    first_conv.register_forward_hook(lambda module, args, output: saved.append(weakref.ref(output)))
    network.register_forward_pre_hook(lambda module, args: alive_at_forward.append(
        saved[-1]() is not None if saved else False))
    summary = train(engine, stage, loader, metrics, world=1)
    loader.close()
    assert summary.skipped_steps == 1 and len(alive_at_forward) == summary.steps > 3
    assert not any(alive_at_forward)  # step 3's forward pass found step 2's activations gone


def test_a_stop_that_lands_on_the_last_step_ends_the_stage_as_finished(tmp_path, tiny_shards, deepspeed_single_rank):
    """The stage has nothing left to train: it must export and finish, not checkpoint and requeue to find that out."""
    spec, network, loader, engine, metrics, log, stage = _teacher_run(tmp_path, tiny_shards, poisoned=set(), epochs=1)
    planned, polls, saves = loader.steps_left(), [], []

    def stop_requested() -> bool:
        polls.append(True)
        return len(polls) == planned

    summary = train(engine, stage, loader, metrics, world=1, stop_requested=stop_requested,
                    checkpointing=Checkpointing(tmp_path / "checkpoints", 100, 2,
                                                lambda checkpoint, seconds, reason: saves.append(reason)))
    loader.close()
    assert not summary.stopped and summary.steps == planned and saves == ["end"]
    assert checkpoints.latest_valid(tmp_path / "checkpoints").loader.epoch == loader.end_epoch == 1
