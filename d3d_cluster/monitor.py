"""A local Prometheus for one run: `d3dc monitor`, and the tests that check the dashboard and the alerts.

It scrapes the run's file_sd targets (and the Pushgateway of its dataprep tasks, when the spec names one),
evaluates the repository's alert rules, keeps its data in the run directory and listens on a free port.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable

import yaml

from d3d_cluster.rundir import SPEC_NAME, RunDir
from d3d_cluster.metrics import targets_dir
from d3d_cluster.spec import Spec

ALERT_RULES = Path(__file__).resolve().parents[1] / "monitoring" / "prometheus" / "alerts.yml"
READY_SECONDS = 30.0


class PrometheusMissing(RuntimeError):
    """No `prometheus` binary on PATH."""


class PrometheusError(RuntimeError):
    """Prometheus did not start, or refused a query; the message carries its own words."""


def find_run(run: str | None, spec: Spec) -> RunDir:
    """RUN as a run directory, or as a run name under the spec's workdir (default: the spec's own run)."""
    given = Path(run) if run else None
    path = given if given is not None and (given / SPEC_NAME).is_file() else spec.path("runs") / (run or spec.name)
    if not (path / SPEC_NAME).is_file():
        raise FileNotFoundError(f"{path}: not a run directory (no {SPEC_NAME}); start a run with `d3dc submit` "
                                "or `d3dc quickstart`, or pass its directory")
    return RunDir(path)


def prometheus_config(target_files: str, pushgateway: str | None = None, rules: Path | None = ALERT_RULES,
                      interval: str = "5s", run: str | None = None) -> dict:
    """Scrape the training ranks announced in `target_files` (a file_sd glob; only those of `run`, if given,
    since runs may share a directory) and, if given, a Pushgateway.

    honor_labels: the endpoints label their own series with run, stage, job_id, node and rank; the same
    labels on the targets would otherwise turn them into exported_* duplicates.
    """
    train = {"job_name": "d3d-train", "honor_labels": True,
             "file_sd_configs": [{"files": [target_files], "refresh_interval": interval}]}
    if run is not None:
        train["relabel_configs"] = [{"source_labels": ["run"], "regex": re.escape(run), "action": "keep"}]
    config = {"global": {"scrape_interval": interval, "evaluation_interval": interval}, "scrape_configs": [train]}
    if pushgateway:
        url = urllib.parse.urlsplit(pushgateway)
        config["scrape_configs"].append({"job_name": "d3d-prep", "honor_labels": True, "scheme": url.scheme,
                                         "static_configs": [{"targets": [url.netloc]}]})
    if rules is not None:
        config["rule_files"] = [str(rules)]
    return config


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Prometheus:
    """A Prometheus server with its config, data and log under `directory`, on loopback."""

    def __init__(self, config: dict, directory: Path, port: int = 0, binary: str = "prometheus"):
        self.config, self.directory, self.requested_port = config, Path(directory), port
        self.binary = shutil.which(binary)
        if self.binary is None:
            raise PrometheusMissing(f"{binary} is not installed (not on PATH): `apt-get install prometheus` on "
                                    "Debian and Ubuntu, or put a Prometheus 2 binary on PATH")
        self.port = 0
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.directory / "prometheus.log"

    def start(self) -> "Prometheus":
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self.directory / "prometheus.yml"
        config.write_text(yaml.safe_dump(self.config, sort_keys=False))
        for _ in range(3):  # a free port can be taken between choosing it and binding it
            self.port = self.requested_port or free_port()
            with self.log.open("w") as log:
                self._process = subprocess.Popen(
                    [self.binary, f"--config.file={config}", f"--storage.tsdb.path={self.directory / 'data'}",
                     f"--web.listen-address=127.0.0.1:{self.port}"],
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            if self._wait_ready():
                return self
            if self.requested_port or "address already in use" not in self.log.read_text():
                break
        tail = "\n".join(self.log.read_text().splitlines()[-5:])
        self.stop()
        raise PrometheusError(f"prometheus did not start (log {self.log}):\n{tail}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + READY_SECONDS
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return True
            except OSError:
                pass
            time.sleep(0.1)
        return False

    def api(self, path: str, **params) -> dict | list:
        """The `data` of a Prometheus HTTP API answer; an error answer raises with Prometheus's message."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as response:
                answer = json.load(response)
        except urllib.error.HTTPError as error:
            answer = json.load(error)
        if answer.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {answer.get('errorType')}: {answer.get('error')}")
        return answer["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """An instant query (now, or at unix time `at`): the result's samples."""
        params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        return self.api("query", **params)["result"]

    def targets(self) -> list[dict]:
        return self.api("targets", state="active")["activeTargets"]

    def wait(self) -> int:
        return self._process.wait()

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def __enter__(self) -> "Prometheus":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def announced_targets(files: list[Path], run: str) -> int:
    """How many endpoints of `run` the target files list now (a retired file lists none)."""
    count = 0
    for path in files:
        try:
            groups = json.loads(path.read_text())
            count += sum(len(g["targets"]) for g in groups if g.get("labels", {}).get("run") == run)
        except (OSError, ValueError, TypeError, KeyError) as error:
            raise ValueError(f"{path}: not a file_sd target file: {error}") from None
    return count


def monitor_run(run: RunDir, port: int = 0, once: bool = False, echo: Callable[[str], None] = print,
                interval: str = "5s", settle_seconds: float = 30.0) -> list[dict]:
    """Start Prometheus on `run`, print its URL; then serve until interrupted, or with `once`, wait until
    every announced endpoint has been scraped, print their health and stop. Returns the targets last seen."""
    spec = run.spec()
    targets = targets_dir(spec, run)
    pattern = targets / "*.json"
    rules = ALERT_RULES if ALERT_RULES.is_file() else None
    config = prometheus_config(str(pattern), spec.metrics.pushgateway, rules, interval, run=spec.name)
    with Prometheus(config, run.path / "metrics" / "prometheus", port) as prometheus:
        echo(f"Prometheus for run {spec.name}: {prometheus.url}  (targets {pattern}; data and log in "
             f"{prometheus.directory})")
        if rules is None:
            echo(f"no alert rules: {ALERT_RULES} is not there (an install without the repository's monitoring/)")
        if not once:
            echo("Ctrl-C stops it.")
            try:
                prometheus.wait()
            except KeyboardInterrupt:
                pass
            return prometheus.targets()
        announced = announced_targets(sorted(targets.glob(pattern.name)), spec.name)
        deadline = time.monotonic() + settle_seconds
        seen = prometheus.targets()
        while (len(seen) < announced or any(t["health"] == "unknown" for t in seen)) and time.monotonic() < deadline:
            time.sleep(0.2)
            seen = prometheus.targets()
        if not seen:
            echo("no live endpoints: the run's ranks announce themselves while they train and retire when they end")
        for target in seen:
            labels = target["labels"]
            error = f" ({target['lastError']})" if target["lastError"] else ""
            echo(f"{target['health']:>7}  {target['scrapeUrl']}  {labels.get('stage', '')} rank "
                 f"{labels.get('rank', '')}{error}")
        return seen
