"""The Grafana dashboard is importable and provisioned; its queries are run against a live Prometheus in
test_live_prometheus.py (Grafana itself is not packaged for Debian)."""

import json
import re
from pathlib import Path

import yaml

GRAFANA = Path(__file__).resolve().parents[2] / "monitoring" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "d3d-training.json"
BUILTIN = {"__rate_interval", "__range", "__interval"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def test_dashboard_is_an_importable_grafana_model():
    model = dashboard()
    assert model["uid"] and model["title"] and model["schemaVersion"] >= 36
    ids = [p["id"] for p in model["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in model["templating"]["list"]}
    assert variables == {"datasource", "run", "stage", "node"}
    for panel in panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used = set(re.findall(r"\$(\w+)", target["expr"]))
            assert used <= variables | BUILTIN, (panel["title"], used)


def test_panels_tile_the_24_column_grid_without_overlap():
    cells = set()
    for panel in dashboard()["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        covered = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not covered & cells, panel["title"]
        cells |= covered


def test_dashboard_shows_what_the_issue_asks_for():
    exprs = " ".join(t["expr"] for p in panels() for t in p["targets"])
    titles = " ".join(p["title"].lower() for p in panels())
    for wanted in ("per stage", "per node", "per rank", "data-wait fraction", "loss", "learning rate",
                   "gradient norm", "gpu utilisation", "gpu memory", "checkpoints", "requeues", "lost",
                   "time to finish"):
        assert wanted in titles, wanted
    for metric in ("d3d_train_clips_total", "d3d_train_data_wait_seconds_sum", "d3d_gpu_utilization_ratio",
                   "d3d_gpu_memory_used_bytes", "d3d_train_eta_seconds", "d3d_train_steps_lost_total",
                   "d3d_train_requeues_total", "d3d_train_checkpoint_seconds_count", "d3d_prep_videos_written_total"):
        assert metric in exprs, metric


def test_provisioning_points_grafana_at_the_dashboard_and_its_default_datasource():
    (source,) = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "d3d-prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus"
    chosen = next(v for v in dashboard()["templating"]["list"] if v["name"] == "datasource")
    assert chosen["query"] == "prometheus" and chosen["current"]["value"] == source["uid"]
    (provider,) = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "d3d.yml").read_text())["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]
