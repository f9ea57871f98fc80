import re

import pytest
from click.testing import CliRunner

from d3d_cluster.cli import main
from d3d_cluster.rundir import RunDir
from d3d_cluster.metrics import TrainMetrics, target_path, targets_dir, write_target
from d3d_cluster.monitor import ALERT_RULES, Prometheus, PrometheusMissing, find_run, prometheus_config
from d3d_cluster.spec import Spec


def _run(tmp_path, **overrides) -> RunDir:
    return RunDir.create(Spec().with_overrides(workdir=str(tmp_path / "work"), name="mine", **overrides))


def test_a_run_is_found_by_directory_or_by_name_under_the_workdir(tmp_path):
    run = _run(tmp_path)
    spec = run.spec()
    assert find_run(str(run.path), Spec()).path == run.path
    assert find_run("mine", spec).path == run.path
    assert find_run(None, spec).path == run.path
    with pytest.raises(FileNotFoundError, match=r"runs/other: not a run directory \(no spec.yaml\)"):
        find_run("other", spec)


def test_config_scrapes_the_run_targets_with_their_own_labels_and_the_pushgateway(tmp_path):
    config = prometheus_config("/w/targets/*.json", "http://gw.example:9091", interval="2s", run="mine.1")
    train, prep = config["scrape_configs"]
    assert train["file_sd_configs"] == [{"files": ["/w/targets/*.json"], "refresh_interval": "2s"}]
    assert train["relabel_configs"] == [{"source_labels": ["run"], "regex": r"mine\.1", "action": "keep"}]
    assert train["honor_labels"] and prep["honor_labels"]
    assert prep["static_configs"] == [{"targets": ["gw.example:9091"]}] and prep["scheme"] == "http"
    assert config["rule_files"] == [str(ALERT_RULES)]


def test_monitor_without_prometheus_installed_says_how_to_get_it(tmp_path, monkeypatch):
    run = _run(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    result = CliRunner().invoke(main, ["monitor", str(run.path), "--once"])
    assert result.exit_code != 0
    assert "prometheus is not installed (not on PATH): `apt-get install prometheus`" in result.output
    with pytest.raises(PrometheusMissing):
        Prometheus({}, tmp_path / "p")


def test_monitor_once_prints_the_url_and_the_health_of_every_live_rank(tmp_path, prometheus_installed):
    run = _run(tmp_path, **{"metrics.targets_dir": "shared/targets"})
    spec = run.spec()
    ranks = [TrainMetrics("mine", "teacher", rank, job_id="5") for rank in range(2)]
    try:
        for rank, metrics in enumerate(ranks):
            port = metrics.serve("127.0.0.1", 0)
            write_target(target_path(targets_dir(spec, run), "mine", "teacher", rank), "127.0.0.1", port, metrics.labels)
        # Other runs' ranks in the shared directory, one with a name that starts like this one's, are not shown.
        for other in ("other", "mine-2"):
            write_target(target_path(targets_dir(spec, run), other, "teacher", 0), "127.0.0.1", 9,
                         {"run": other, "stage": "teacher", "rank": "0"})
        result = CliRunner().invoke(main, ["monitor", "mine", "--workdir", str(tmp_path / "work"), "--once"])
    finally:
        for metrics in ranks:
            metrics.close()
    assert result.exit_code == 0, result.output
    assert re.search(r"Prometheus for run mine: http://127\.0\.0\.1:\d+", result.output)
    assert (run.path / "metrics" / "prometheus" / "data").is_dir()
    health = re.findall(r"^\s*(\w+)\s+http://127\.0\.0\.1:\d+/metrics\s+teacher rank (\d)", result.output, re.M)
    assert sorted(health) == [("up", "0"), ("up", "1")], result.output
