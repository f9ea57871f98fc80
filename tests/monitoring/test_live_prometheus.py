"""A real Prometheus scrapes live training: every dashboard query and alert expression must answer, and the
data-starvation alert must fire on a starved loader and stay quiet on a fed one."""

import itertools
import json
import math
import re
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY, tiny_spec
from job_control import wait_until

from d3d_cluster.data.pipeline import ClipLoader
from d3d_cluster.data.schema import Manifest
from d3d_cluster.launch.pipeline import JobCancelled, run_stage
from d3d_cluster.rundir import RunDir
from d3d_cluster.launch.status import cancel_run
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


SAMPLES = 3  # scrapes of every rank's series before the queries: rate() needs two in its window


def scraped_enough(prometheus: Prometheus, run: str, ranks: int) -> float | None:
    """A moment at which Prometheus holds at least SAMPLES scrapes of every rank's step counter within the last
    minute (the window the dashboard's rates use here), the last of them after a step; None before that."""
    at = time.time()
    counts = prometheus.query(f'count_over_time(d3d_train_steps_total{{run="{run}"}}[1m])', at=at)
    stepped = prometheus.query(f'd3d_train_steps_total{{run="{run}"}} > 0', at=at)
    enough = {s["metric"]["rank"] for s in counts if float(s["value"][1]) >= SAMPLES}
    return at if len(enough & {s["metric"]["rank"] for s in stepped}) == ranks else None


def test_every_dashboard_query_and_alert_answers_on_a_live_stage_job(tmp_path, tiny_shards, pushgateway,
                                                                      prometheus_installed):
    """The stage is bounded by scrapes, not epochs: it trains (far longer than the test needs, on any machine)
    until Prometheus has scraped every rank enough, the queries are asked of the live job, then it is cancelled
    as a user would cancel it."""
    spec = tiny_spec(tmp_path, data={**TINY["data"], "shards": str(tiny_shards)}, teacher={"epochs": 100_000},
                     metrics={"pushgateway": pushgateway})
    run = RunDir.create(spec)
    targets = targets_dir(spec, run)
    config = prometheus_config(str(targets / f"{spec.name}-*.json"), pushgateway, ALERT_RULES, interval="1s")
    with Prometheus(config, tmp_path / "prometheus") as prometheus:
        prep = PrepProgress(pushgateway, run=spec.name, task=0, videos=18)
        prep.record(written=17, rejected=1)
        prep.finish()
        lines, outcome = [], []

        def follow() -> None:  # `d3dc submit teacher` in the foreground
            try:
                run_stage(run, "teacher", echo=lines.append, poll_seconds=0.2)
            except Exception as error:
                outcome.append(error)

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        try:
            at = wait_until(lambda: outcome or scraped_enough(prometheus, spec.name, ranks=2),
                            "every rank's series to be scraped while it trains", timeout=600)
            assert not outcome, outcome
            _every_query_answers(prometheus, spec.name, run, at)
        finally:
            cancel_run(run)
            follower.join(timeout=300)
        assert isinstance(outcome[0], JobCancelled), outcome

        # The ranks retired their targets: Prometheus stops scraping them.
        def training_targets():
            return [t for t in prometheus.targets() if t["scrapePool"] == "d3d-train"]

        wait_until(lambda: not training_targets(), "Prometheus to drop the retired targets", timeout=60, poll=0.5)
    assert [json.loads(p.read_text()) for p in targets.glob("*.json")] == [[], []]
    assert any(line.startswith("[teacher] rank 0/2 metrics at http://127.0.0.1:") for line in lines)


def _every_query_answers(prometheus: Prometheus, name: str, run: RunDir, at: float) -> None:
    (job_id,) = {e["job_id"] for e in run.events() if e["event"] == "started"}
    clips = prometheus.query(f'd3d_train_clips_total{{run="{name}"}}', at=at)
    steps = {s["metric"]["rank"]: float(s["value"][1])
             for s in prometheus.query(f'd3d_train_steps_total{{run="{name}"}}', at=at)}
    assert {s["metric"]["rank"] for s in clips} == {"0", "1"}
    for s in clips:
        assert s["metric"]["stage"] == "teacher" and s["metric"]["job_id"] == job_id
        assert s["metric"]["node"] == socket.gethostname() and "exported_run" not in s["metric"]
        # One scrape reads both counters of a rank: its clips are its steps times its batch.
        assert float(s["value"][1]) == TINY["data"]["batch_size"] * steps[s["metric"]["rank"]] > 0

    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = expand(target["expr"], name)
            result = prometheus.query(expr, at=at)  # raises on an invalid query
            if CPU_ABSENT in expr:
                assert result == [], (panel["title"], expr)
            else:
                assert result, (panel["title"], expr)
    for variable in dashboard["templating"]["list"][1:]:
        metric, label = re.fullmatch(r"label_values\((.*), (\w+)\)", variable["query"]["query"]).groups()
        values = prometheus.query(f"count by ({label}) ({expand(metric, name)})", at=at)
        assert values and all(v["metric"][label] for v in values), variable["name"]

    rules = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
    assert len(rules) == 6
    for rule in rules:
        assert rule["health"] == "ok" and not rule.get("lastError"), rule
        prometheus.query(rule["query"], at=at)


class PacedLoader:
    """An epoch's worth of the real loader's steps, decoded up front and then handed out again and again, each batch
    `delay` seconds after the step asks for it: with no delay a loader that never keeps a step waiting, with one a
    loader on a slow file system, whatever this machine's decoding speed."""

    def __init__(self, loader: ClipLoader, delay: float = 0.0):
        self.loader, self.delay = loader, delay
        self.decoded = list(itertools.islice(loader.batches(), math.ceil(loader.steps_per_epoch)))

    def __getattr__(self, name: str):
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.decoded)

    def batches(self):
        for batch in itertools.cycle(self.decoded):
            time.sleep(self.delay)
            yield batch


class ScrapeCounter:
    """A collector without metrics that counts how often its registry is read: once per scrape."""

    def __init__(self):
        self.scrapes = 0

    def collect(self):
        self.scrapes += 1
        return iter(())


def wait_until_scraped(prometheus: Prometheus, port: int, seconds: float = 60) -> None:
    wait_until(lambda: any(t["scrapeUrl"] == f"http://127.0.0.1:{port}/metrics" and t["health"] == "up"
                           for t in prometheus.targets()),
               f"Prometheus to scrape 127.0.0.1:{port}", timeout=seconds, poll=0.2)


def without_for_durations(rules: Path, into: Path) -> Path:
    """The alert rules with every `for:` at 0s: their timing is promtool's test, their firing this one's."""
    tree = yaml.safe_load(rules.read_text())
    for group in tree["groups"]:
        for rule in group["rules"]:
            rule["for"] = "0s"
    into.write_text(yaml.safe_dump(tree))
    return into


SCRAPES_PER_RUN = 4  # each run trains until Prometheus has scraped it this often: enough for rate(), any speed
STARVED_WAIT = 4  # the starved loader keeps a step waiting 4 times as long as the fed run's steps took


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
        served, fed_step_seconds = [], None
        for run in ("fed", "starved"):
            real = ClipLoader(tiny_shards, "train", spec.data, modalities=stage.modalities, train=True,
                              epochs=100_000, rank=0, world=1, seed=0)
            loader = PacedLoader(real, 0.0 if run == "fed" else STARVED_WAIT * fed_step_seconds)
            metrics = TrainMetrics(run, "teacher", 0, job_id="1")
            counter = ScrapeCounter()
            metrics.registry.register(counter)
            port = metrics.serve("127.0.0.1", 0)
            served.append((metrics, port))
            write_target(target_path(tmp_path / "targets", run, "teacher", 0), "127.0.0.1", port, metrics.labels)
            wait_until_scraped(prometheus, port)  # so that the scrapes see the whole of this short training
            engine = initialize(build_model(spec.model, "flow", len(manifest.classes)), spec.teacher.optimizer,
                                spec.deepspeed, spec.data.batch_size, spec.grad_accumulation, 100, len(loader))
            enough = counter.scrapes + SCRAPES_PER_RUN
            summary = train(engine, stage, loader, metrics, world=1, stop_requested=lambda: counter.scrapes >= enough)
            assert summary.stopped and summary.steps > 0
            fed_step_seconds = fed_step_seconds or summary.seconds / summary.steps
            real.close()

        def firing() -> set[str]:
            alerts = prometheus.query('max_over_time(ALERTS{alertname="D3DDataStarved", alertstate="firing"}[5m])')
            return {a["metric"]["run"] for a in alerts}

        assert wait_until(firing, "the data-starvation alert to fire", timeout=60) == {"starved"}
        fraction = prometheus.query("rate(d3d_train_data_wait_seconds_sum[5m]) / rate(d3d_train_step_seconds_sum[5m])")
        by_run = {f["metric"]["run"]: float(f["value"][1]) for f in fraction}
        assert by_run["starved"] > 0.5 and by_run["fed"] < 0.3, by_run

        for metrics, port in served:  # the live exposition passes Prometheus's own lint
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
            lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True)
            assert lint.returncode == 0, lint.stdout.decode() + lint.stderr.decode()
            metrics.close()
