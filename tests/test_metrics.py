import json
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from d3d_cluster.metrics import TrainMetrics, retire_target, write_target


def _scrape(port: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, s.labels.get("rank")): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_each_rank_serves_its_own_step_metrics_on_a_free_port():
    ranks = [TrainMetrics("run", "teacher", rank) for rank in range(2)]
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
        assert _scrape(ports[1]).get(("d3d_train_clips_total", "1"), 0) == 0
    finally:
        for metrics in ranks:
            metrics.close()


def test_target_files_announce_then_retire_an_endpoint(tmp_path):
    path = tmp_path / "targets" / "teacher-rank0.json"
    write_target(path, "127.0.0.1", 9100, {"run": "r", "stage": "teacher", "rank": "0"})
    assert json.loads(path.read_text()) == [
        {"targets": ["127.0.0.1:9100"], "labels": {"run": "r", "stage": "teacher", "rank": "0"}}
    ]
    retire_target(path)
    assert json.loads(path.read_text()) == []
    assert not list(path.parent.glob("*.tmp"))
