import fnmatch
import subprocess
from pathlib import Path

import yaml

from d3d_cluster.rundir import RunDir
from d3d_cluster.metrics import target_path, targets_dir
from d3d_cluster.spec import Spec

MONITORING = Path(__file__).resolve().parents[2] / "monitoring"
CONFIG = MONITORING / "prometheus" / "prometheus.yml"
REPO = MONITORING.parent


def test_file_sd_glob_matches_the_target_files_of_runs_sharing_the_readme_workdir():
    config = yaml.safe_load(CONFIG.read_text())
    train = next(job for job in config["scrape_configs"] if job["job_name"] == "d3d-train")
    (pattern,) = train["file_sd_configs"][0]["files"]
    # Prometheus resolves relative file_sd paths against the config file's directory.
    pattern = str((CONFIG.parent / pattern).resolve(strict=False))
    spec = Spec().with_overrides(workdir=str(REPO / "d3dc-work"), name="any-run",
                                 **{"metrics.targets_dir": "metrics/targets"})
    target = target_path(targets_dir(spec, RunDir(spec.run_dir)), spec.name, "student", 3)
    assert fnmatch.fnmatch(str(target), pattern)
    assert train["honor_labels"] is True


def test_prometheus_config_and_alert_rules_pass_promtool(promtool):
    config = subprocess.run([promtool, "check", "config", str(CONFIG)], capture_output=True, text=True)
    assert config.returncode == 0, config.stdout + config.stderr
    assert "SUCCESS: 1 rule files found" in config.stdout
    rules = subprocess.run([promtool, "check", "rules", str(MONITORING / "prometheus" / "alerts.yml")],
                           capture_output=True, text=True)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "SUCCESS: 6 rules found" in rules.stdout


def test_alerts_fire_after_their_for_durations_and_only_for_the_series_at_fault(promtool):
    unit = Path(__file__).with_name("alerts_test.yml")
    result = subprocess.run([promtool, "test", "rules", unit.name], cwd=unit.parent, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    names = {rule["alert"] for group in yaml.safe_load((MONITORING / "prometheus" / "alerts.yml").read_text())["groups"]
             for rule in group["rules"]}
    tested = {case["alertname"] for test in yaml.safe_load(unit.read_text())["tests"] for case in test["alert_rule_test"]}
    assert tested == names
