import json
import math
import socket
import types
import urllib.request

import pynvml
import pytest
from prometheus_client.parser import text_string_to_metric_families

from d3d_cluster.metrics import (GpuCollector, GpuUnavailable, PrepProgress, StepObservation, TrainMetrics,
                                 bind_address, retire_target, target_path, write_target)
from d3d_cluster.monitor import free_port
from d3d_cluster.spec import MetricsSpec

LABELS = {"run": "r", "stage": "teacher", "job_id": "42", "node": "n1", "rank": "0"}


def _metrics(**labels) -> TrainMetrics:
    merged = {**LABELS, **labels}
    return TrainMetrics(merged["run"], merged["stage"], int(merged["rank"]), job_id=merged["job_id"],
                        node=merged["node"])


def _value(metrics: TrainMetrics, name: str, **extra) -> float | None:
    return metrics.registry.get_sample_value(name, {**metrics.labels, **extra})


def _scrape(port: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, s.labels.get("rank")): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_each_rank_serves_its_own_step_metrics_on_a_free_port():
    ranks = [_metrics(rank=str(rank)) for rank in range(2)]
    ports = [m.serve("127.0.0.1", 0) for m in ranks]
    try:
        assert ports[0] != ports[1]
        ranks[0].observe_step(8, 0.5, 0.1, loss=1.5, distillation=0.2, learning_rate=0.01, epoch=0.25)
        ranks[0].observe_step(8, 0.25, 0.0, loss=1.0, distillation=0.1, learning_rate=0.02, epoch=0.5)
        first = _scrape(ports[0])
        assert first[("d3d_train_clips_total", "0")] == 16
        assert first[("d3d_train_loss", "0")] == 1.0
        assert first[("d3d_train_clips_per_second", "0")] == 32.0
        assert first[("d3d_train_data_wait_seconds_count", "0")] == 2
        assert first[("d3d_train_learning_rate", "0")] == 0.02
        assert ("d3d_train_clips_total", "1") not in first
        assert _scrape(ports[1])[("d3d_train_clips_total", "1")] == 0
    finally:
        for metrics in ranks:
            metrics.close()


def test_every_series_carries_run_stage_job_node_and_rank():
    metrics = _metrics()
    metrics.observe_step(4, 0.2, 0.05, loss=1.0, distillation=0.0, learning_rate=0.1, epoch=0.1, grad_norm=2.0)
    metrics.checkpoint_written(1.0)
    families = list(metrics.registry.collect())
    assert len(families) >= 20
    for family in families:
        for sample in family.samples:
            assert {k: sample.labels[k] for k in LABELS} == LABELS, sample


def test_event_counters_start_at_zero_and_count_what_their_methods_record():
    metrics = _metrics()
    events = ("d3d_train_skipped_steps_total", "d3d_train_corrupt_samples_total", "d3d_train_requeues_total",
              "d3d_train_steps_lost_total", "d3d_train_checkpoint_seconds_count")
    assert [_value(metrics, name) for name in events] == [0, 0, 0, 0, 0]  # so increase() sees the first event
    metrics.step_skipped()
    metrics.step_skipped()
    metrics.corrupt_samples(3)
    metrics.requeued(2)
    metrics.steps_lost(40)
    metrics.checkpoint_written(2.5)
    metrics.checkpoint_written(0.7)
    assert [_value(metrics, name) for name in events] == [2, 3, 2, 40, 2]
    assert _value(metrics, "d3d_train_checkpoint_seconds_sum") == pytest.approx(3.2)
    assert _value(metrics, "d3d_train_checkpoint_seconds_bucket", le="1.0") == 1
    assert _value(metrics, "d3d_train_last_checkpoint_timestamp_seconds") == pytest.approx(
        metrics.registry.get_sample_value("d3d_train_last_step_timestamp_seconds", metrics.labels), abs=60)


def test_gauges_are_unknown_until_the_first_step_and_grad_norm_only_moves_on_optimizer_steps():
    metrics = _metrics()
    assert math.isnan(_value(metrics, "d3d_train_loss"))
    assert math.isnan(_value(metrics, "d3d_train_eta_seconds"))
    metrics.observe_step(2, 0.1, 0.0, loss=2.0, distillation=0.5, learning_rate=0.1, epoch=0.5, grad_norm=3.0)
    metrics.observe_step(2, 0.1, 0.0, loss=1.0, distillation=0.5, learning_rate=0.1, epoch=1.0, grad_norm=None)
    assert _value(metrics, "d3d_train_grad_norm") == 3.0
    assert _value(metrics, "d3d_train_loss") == 1.0
    assert _value(metrics, "d3d_train_samples_total") == 4


def test_eta_is_remaining_steps_times_the_smoothed_step_time():
    metrics = _metrics()
    metrics.plan(epochs=4, steps_per_epoch=10)
    metrics.observe_step(2, 1.0, 0.0, loss=1.0, distillation=0.0, learning_rate=0.1, epoch=0.1)
    assert _value(metrics, "d3d_train_eta_seconds") == pytest.approx(39 * 1.0)
    assert _value(metrics, "d3d_train_epochs") == 4
    metrics.observe_step(2, 2.0, 0.0, loss=1.0, distillation=0.0, learning_rate=0.1, epoch=0.2)
    assert _value(metrics, "d3d_train_eta_seconds") == pytest.approx(38 * 1.1)  # 1.0 + 0.1 x (2.0 - 1.0)
    metrics.observe_step(2, 2.0, 0.0, loss=1.0, distillation=0.0, learning_rate=0.1, epoch=4.0)
    assert _value(metrics, "d3d_train_eta_seconds") == 0


def test_steps_observed_together_leave_every_series_as_observing_them_one_by_one():
    steps = [StepObservation(2, 0.1, 0.01, 2.0, 0.5, 0.1, 0.25, 3.0, 3),
             StepObservation(2, 0.4, 0.0, 1.5, 0.4, 0.2, 0.5),
             StepObservation(1, 0.2, 0.3, 1.0, 0.3, 0.3, 0.75, None, 1)]
    one_by_one, together = _metrics(), _metrics()
    for metrics in (one_by_one, together):
        metrics.plan(epochs=2, steps_per_epoch=4)
    for step in steps:
        one_by_one.observe_step(*step)
    together.observe_steps(steps)

    def samples(metrics):
        return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                for family in metrics.registry.collect() for sample in family.samples
                if not sample.name.endswith(("_created", "_timestamp_seconds"))}

    assert samples(together) == samples(one_by_one)
    assert _value(together, "d3d_train_grad_norm") == 3.0 and _value(together, "d3d_train_samples_total") == 6
    assert _value(together, "d3d_train_step_seconds_count") == 3


def test_a_fixed_port_that_is_taken_falls_back_to_a_free_one():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        metrics = _metrics()
        try:
            port = metrics.serve("127.0.0.1", taken)
            assert port not in (0, taken)
            assert ("d3d_train_steps_total", "0") in _scrape(port)
        finally:
            metrics.close()


def test_an_address_that_cannot_be_bound_is_an_error_naming_it():
    with pytest.raises(OSError, match="metrics endpoint on 192.0.2.1:0"):
        _metrics().serve("192.0.2.1", 0)  # TEST-NET-1: an address this machine does not have


def test_bind_defaults_to_all_interfaces_on_slurm_and_loopback_locally():
    assert bind_address(MetricsSpec(), "slurm") == "0.0.0.0"
    assert bind_address(MetricsSpec(), "local") == "127.0.0.1"
    assert bind_address(MetricsSpec(bind="10.1.2.3"), "slurm") == "10.1.2.3"


def test_target_files_announce_then_retire_an_endpoint(tmp_path):
    path = target_path(tmp_path / "targets", "r", "teacher", 0)
    assert path.name == "r-teacher-rank0.json"
    write_target(path, "127.0.0.1", 9100, LABELS)
    assert json.loads(path.read_text()) == [{"targets": ["127.0.0.1:9100"], "labels": LABELS}]
    retire_target(path)
    assert json.loads(path.read_text()) == []
    assert not list(path.parent.glob("*.tmp"))
    write_target(path, "::1", 9100, LABELS)
    assert json.loads(path.read_text())[0]["targets"] == ["[::1]:9100"]


class FakeNvml:
    """NVML as a GPU node's driver answers it; no GPU exists on the machines these tests run on."""

    NVMLError = pynvml.NVMLError

    def __init__(self):
        self.busy = 37

    def nvmlInit(self):
        pass

    def nvmlDeviceGetHandleByUUID(self, uuid):
        if uuid != "GPU-1234":
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        return "handle"

    def nvmlDeviceGetUtilizationRates(self, handle):
        return types.SimpleNamespace(gpu=self.busy, memory=10)

    def nvmlDeviceGetMemoryInfo(self, handle):
        return types.SimpleNamespace(used=3 * 2**30, total=80 * 2**30, free=77 * 2**30)


def test_gpu_collector_exports_utilisation_and_memory_in_base_units_at_scrape_time():
    metrics, nvml = _metrics(), FakeNvml()
    metrics.registry.register(GpuCollector("GPU-1234", metrics.labels, nvml=nvml))
    labels = {**metrics.labels, "gpu": "GPU-1234"}
    assert metrics.registry.get_sample_value("d3d_gpu_utilization_ratio", labels) == 0.37
    nvml.busy = 90
    assert metrics.registry.get_sample_value("d3d_gpu_utilization_ratio", labels) == 0.9
    assert metrics.registry.get_sample_value("d3d_gpu_memory_used_bytes", labels) == 3 * 2**30
    assert metrics.registry.get_sample_value("d3d_gpu_memory_total_bytes", labels) == 80 * 2**30
    with pytest.raises(GpuUnavailable, match="NVML"):
        GpuCollector("GPU-9999", metrics.labels, nvml=nvml)


def test_without_an_nvidia_driver_there_are_no_gpu_series():
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pytest.skip("this machine has an NVIDIA driver")
    metrics = _metrics()
    with pytest.raises(GpuUnavailable, match="NVML"):
        GpuCollector("GPU-1234", metrics.labels)
    assert not [f for f in metrics.registry.collect() if f.name.startswith("d3d_gpu")]


def test_prep_progress_reaches_a_real_pushgateway_grouped_by_run_and_task(pushgateway):
    progress = PrepProgress(pushgateway, run="r", task=3, videos=10, job_id="77_3", node="n1", interval=3600)
    progress.record(written=1)  # the first record pushes; the next ones wait for the interval
    progress.record(written=5, rejected=2)
    text = urllib.request.urlopen(f"{pushgateway}/metrics", timeout=5).read().decode()
    pushed = {(s.name, s.labels.get("task")): s for f in text_string_to_metric_families(text) for s in f.samples}
    assert pushed[("d3d_prep_videos_written_total", "3")].value == 1
    progress.finish()
    text = urllib.request.urlopen(f"{pushgateway}/metrics", timeout=5).read().decode()
    pushed = {(s.name, s.labels.get("task")): s for f in text_string_to_metric_families(text) for s in f.samples}
    written = pushed[("d3d_prep_videos_written_total", "3")]
    assert written.value == 6
    assert written.labels == {"job": "d3d_prep", "run": "r", "task": "3", "job_id": "77_3", "node": "n1", "instance": ""}
    assert pushed[("d3d_prep_videos_rejected_total", "3")].value == 2
    assert pushed[("d3d_prep_videos", "3")].value == 10
    assert pushed[("d3d_prep_seconds", "3")].value >= 0


def test_an_unreachable_pushgateway_warns_once_and_the_task_goes_on():
    closed = free_port()  # free, so nothing answers there
    progress = PrepProgress(f"http://127.0.0.1:{closed}", run="r", task=0, videos=2, interval=0)
    with pytest.warns(RuntimeWarning, match=f"metrics.pushgateway http://127.0.0.1:{closed}: cannot push"):
        progress.record(written=1)
        progress.record(written=1)
        progress.finish()
