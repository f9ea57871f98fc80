"""A real Prometheus scrapes live training: every dashboard query and alert expression must answer, and the
data-starvation alert must fire on a starved loader and stay quiet on a fed one."""

import json
import re
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY, tiny_spec

from d3d_cluster.data.pipeline import ClipLoader
from d3d_cluster.data.schema import Manifest
from d3d_cluster.launch.pipeline import run_stage
from d3d_cluster.launch.rundir import RunDir
from d3d_cluster.metrics import PrepProgress, TrainMetrics, target_path, targets_dir, write_target
from d3d_cluster.monitor import ALERT_RULES, Prometheus, prometheus_config
from d3d_cluster.train.engine import initialize
from d3d_cluster.train.loop import train
from d3d_cluster.train.stages import build_model, build_stage

pytestmark = pytest.mark.integration
DASHBOARD = Path(__file__).resolve().parents[2] / "monitoring" / "grafana" / "dashboards" / "d3d-training.json"
CPU_ABSENT = "d3d_gpu_"  # series a CPU-only run does not have


def expand(expr: str, run: str) -> str:
    """A dashboard query as Grafana would send it with run = `run` and every other variable at All."""
    expr = expr.replace("$__rate_interval", "1m").replace("$__range", "10m").replace("$run", re.escape(run))
    return expr.replace("$stage", ".*").replace("$node", ".*")


def last_scrape_of_all(prometheus: Prometheus, expr: str, since: float) -> float:
    """The last time every series of `expr` was still scraped (a query then sees all ranks; once a rank has
    retired its target, its series are marked stale)."""
    data = prometheus.api("query_range", query=expr, start=f"{since:.3f}", end=f"{time.time():.3f}", step="1")
    assert data["result"], f"no samples of {expr}"
    return min(max(float(t) for t, _ in series["values"]) for series in data["result"])


def test_every_dashboard_query_and_alert_answers_on_a_live_stage_job(tmp_path, tiny_shards, pushgateway,
                                                                      prometheus_installed):
    spec = tiny_spec(tmp_path, data={**TINY["data"], "shards": str(tiny_shards)}, teacher={"epochs": 12},
                     metrics={"pushgateway": pushgateway})
    run = RunDir.create(spec)
    targets = targets_dir(spec, run)
    config = prometheus_config(str(targets / f"{spec.name}-*.json"), pushgateway, ALERT_RULES, interval="1s")
    started = time.time()
    with Prometheus(config, tmp_path / "prometheus") as prometheus:
        prep = PrepProgress(pushgateway, run=spec.name, task=0, videos=18)
        prep.record(written=17, rejected=1)
        prep.finish()
        lines = []
        run_stage(run, "teacher", echo=lines.append)
        at = last_scrape_of_all(prometheus, f'd3d_train_steps_total{{run="{spec.name}"}}', started)

        (job_id,) = {e["job_id"] for e in run.events() if e["event"] == "started"}
        series = prometheus.query(f'd3d_train_clips_total{{run="{spec.name}"}}', at=at)
        assert {s["metric"]["rank"] for s in series} == {"0", "1"}
        for s in series:
            assert s["metric"]["stage"] == "teacher" and s["metric"]["job_id"] == job_id
            assert s["metric"]["node"] == socket.gethostname() and "exported_run" not in s["metric"]
        # Up to epochs x training clips: the last steps can end between two scrapes.
        assert 0 < sum(float(s["value"][1]) for s in series) <= 12 * 12

        dashboard = json.loads(DASHBOARD.read_text())
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                expr = expand(target["expr"], spec.name)
                result = prometheus.query(expr, at=at)  # raises on an invalid query
                if CPU_ABSENT in expr:
                    assert result == [], (panel["title"], expr)
                else:
                    assert result, (panel["title"], expr)
        for variable in dashboard["templating"]["list"][1:]:
            metric, label = re.fullmatch(r"label_values\((.*), (\w+)\)", variable["query"]["query"]).groups()
            values = prometheus.query(f"count by ({label}) ({expand(metric, spec.name)})", at=at)
            assert values and all(v["metric"][label] for v in values), variable["name"]

        rules = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
        assert len(rules) == 6
        for rule in rules:
            assert rule["health"] == "ok" and not rule.get("lastError"), rule
            prometheus.query(rule["query"], at=at)

        # The ranks retired their targets: Prometheus stops scraping them.
        def training_targets():
            return [t for t in prometheus.targets() if t["scrapePool"] == "d3d-train"]

        deadline = time.monotonic() + 15
        while training_targets() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert training_targets() == []
    assert [json.loads(p.read_text()) for p in targets.glob("*.json")] == [[], []]
    assert any(line.startswith("[teacher] rank 0/2 metrics at http://127.0.0.1:") for line in lines)


class SlowLoader:
    """The real loader, each batch `delay` seconds late, like shards on a slow file system."""

    def __init__(self, loader: ClipLoader, delay: float):
        self.loader, self.delay = loader, delay

    def __getattr__(self, name: str):
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int):
        for batch in self.loader.epoch(epoch):
            time.sleep(self.delay)
            yield batch


def wait_until_scraped(prometheus: Prometheus, port: int, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if any(t["scrapeUrl"] == f"http://127.0.0.1:{port}/metrics" and t["health"] == "up"
               for t in prometheus.targets()):
            return
        time.sleep(0.2)
    raise AssertionError(f"Prometheus did not scrape 127.0.0.1:{port} within {seconds} s")


def without_for_durations(rules: Path, into: Path) -> Path:
    """The alert rules with every `for:` at 0s: their timing is promtool's test, their firing this one's."""
    tree = yaml.safe_load(rules.read_text())
    for group in tree["groups"]:
        for rule in group["rules"]:
            rule["for"] = "0s"
    into.write_text(yaml.safe_dump(tree))
    return into


def test_data_starvation_alert_fires_on_a_slow_loader_and_not_on_a_fed_one(tmp_path, tiny_shards, promtool,
                                                                           prometheus_installed,
                                                                           deepspeed_single_rank):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a one-CPU rank runs; more threads only fight on a loaded 2-core machine
    try:
        _train_fed_and_starved(tmp_path, tiny_shards, promtool)
    finally:
        torch.set_num_threads(threads)


def _train_fed_and_starved(tmp_path, tiny_shards, promtool):
    spec = tiny_spec(tmp_path, data={**TINY["data"], "shards": str(tiny_shards)}, cluster={"tasks_per_node": 1})
    manifest = Manifest.load(tiny_shards)
    stage = build_stage(spec, "teacher", tmp_path, len(manifest.classes), torch.device("cpu"))
    rules = without_for_durations(ALERT_RULES, tmp_path / "alerts.yml")
    config = prometheus_config(str(tmp_path / "targets" / "*.json"), rules=rules, interval="1s")
    with Prometheus(config, tmp_path / "prometheus") as prometheus:
        served = []
        for run, delay, epochs in (("fed", 0.0, 8), ("starved", 0.3, 3)):
            loader = SlowLoader(ClipLoader(tiny_shards, "train", spec.data, modalities=stage.modalities, train=True,
                                           epochs=epochs, rank=0, world=1, seed=0), delay)
            metrics = TrainMetrics(run, "teacher", 0, job_id="1")
            port = metrics.serve("127.0.0.1", 0)
            served.append((metrics, port))
            write_target(target_path(tmp_path / "targets", run, "teacher", 0), "127.0.0.1", port, metrics.labels)
            wait_until_scraped(prometheus, port)  # so that the scrapes see the whole of this short training
            engine = initialize(build_model(spec.model, "flow", len(manifest.classes)), spec.teacher.optimizer,
                                spec.deepspeed, spec.data.batch_size, spec.grad_accumulation, 100, len(loader))
            train(engine, stage, loader, metrics, world=1)
            loader.loader.close()
        time.sleep(3)  # a few more evaluations with both endpoints still up

        firing = prometheus.query('max_over_time(ALERTS{alertname="D3DDataStarved", alertstate="firing"}[5m])')
        assert {a["metric"]["run"] for a in firing} == {"starved"}
        fraction = prometheus.query("rate(d3d_train_data_wait_seconds_sum[5m]) / rate(d3d_train_step_seconds_sum[5m])")
        by_run = {f["metric"]["run"]: float(f["value"][1]) for f in fraction}
        assert by_run["starved"] > 0.5 and by_run["fed"] < 0.3, by_run

        for metrics, port in served:  # the live exposition passes Prometheus's own lint
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
            lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True)
            assert lint.returncode == 0, lint.stdout.decode() + lint.stderr.decode()
            metrics.close()
