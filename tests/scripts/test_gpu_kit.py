"""The GPU kit works on the day a GPU is lent: `scripts/gpu-kit` packs parts that `scripts/gpu-check` joins back,
and `scripts/gpu-check --dry-run` runs its whole sequence here, with the GPU parts skipped."""

import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _load(name: str):
    loader = importlib.machinery.SourceFileLoader(name.replace("-", "_"), str(SCRIPTS / name))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_the_kit_packs_parts_that_each_fit_a_command_and_the_check_joins_them_back(tmp_path, monkeypatch):
    kit, check = _load("gpu-kit"), _load("gpu-check")
    base = tmp_path / "base"
    (base / "wheels").mkdir(parents=True)
    (base / "wheels" / "small-1.0-py3-none-any.whl").write_bytes(os.urandom(300_000))
    wheel = tmp_path / "nvidia_dali_cuda130-9.9-py3-none-manylinux_2_28_x86_64.whl"
    wheel.write_bytes(os.urandom(2_500_000))
    quickstart = tmp_path / "quickstart-shards"
    quickstart.mkdir()
    (quickstart / "shard-000000.tar").write_bytes(os.urandom(200_000))
    part_bytes = 1 << 20

    parts = kit.pack(base, wheel, quickstart, tmp_path / "kit", part_bytes)

    assert len(parts) == 4  # 2.8 MB in parts of 1 MiB, the first shared by the base and the wheel's first chunk,
    assert [f.name for f in parts[-1].iterdir() if f.name != "kit.json"] == ["quickstart.tar"]  # then the quickstart
    for part in parts:
        assert sum(f.stat().st_size for f in part.iterdir() if f.name != "kit.json") <= part_bytes
    repo, store = tmp_path / "repo", tmp_path / "store"
    monkeypatch.setattr(check, "ROOT", repo)
    monkeypatch.setattr(check, "STORE", store)
    for part in parts:  # one device command each: what it carried lands in .kit, and is moved to the store
        shutil.rmtree(repo / ".kit", ignore_errors=True)
        shutil.copytree(part, repo / ".kit" / part.name)
        stored = check.receive()
    description = json.loads((store / "parts" / "kit.json").read_text())
    assert set(description["dali"]["chunks"]) | {"base.tar", "kit.json", "quickstart.tar"} == set(stored)
    assert check.sha256(store / "parts" / "quickstart.tar") == description["quickstart"]["sha256"]
    joined = check.join_dali(store / "parts", description)
    assert joined is not None and joined.read_bytes() == wheel.read_bytes()

    (store / "parts" / description["dali"]["chunks"][1]).write_bytes(b"damaged in transit")
    assert check.join_dali(store / "parts", description) is None


@pytest.mark.integration
def test_gpu_check_dry_run_runs_every_tier_on_the_cpu_and_skips_only_the_gpu_parts(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPTS / "gpu-check"), "--dry-run"], env={**os.environ, "OUT": str(tmp_path)},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    statuses = {name: step["status"] for name, step in report["steps"].items()}
    assert statuses == {"preflight": "ok", "install": "skipped", "model_step": "ok", "gpu_tests": "ok",
                        "model_step_pool3d": "ok", "loader": "ok", "data_wait": "ok"}
    assert list(statuses)[:4] == ["preflight", "install", "loader", "data_wait"]  # the data plane's decisions first
    for name in ("model_step.json", "model_step_pool3d.json", "loader.json", "gpu-tests.xml"):
        assert (tmp_path / name).is_file(), name
    layouts = json.loads((tmp_path / "loader.json").read_text())["results"]  # one pipeline against two, same run
    assert {name: sorted(by_layout) for name, by_layout in layouts.items()} == {"rgb": ["1x1", "1x1cpu", "2x1"],
                                                                                "rgb+flow": ["1x1", "1x1cpu", "2x1"]}
    assert all(entry["dali_median"] > 0 for by_layout in layouts.values() for entry in by_layout.values())
    loader = layouts["rgb+flow"]
    fastest_mixed = max(("1x1", "2x1"), key=lambda layout: loader[layout]["dali_median"])
    layouts = json.loads((tmp_path / "data_wait.json").read_text())["results"]  # the one benchmark only this runs
    assert {layout: sorted(stages) for layout, stages in layouts.items()} == {  # the specs' and the loader's best
        layout: ["student", "teacher"] for layout in {"1x1", fastest_mixed, "1x1cpu"}}
    assert all(0 <= stage["data_wait_share"] < 1 and stage["median_clips_per_s"] > 0
               for stages in layouts.values() for stage in stages.values())
    if not report["preflight"]["torch"]["available"]:  # the GPU tests skip themselves without CUDA
        suite = ElementTree.parse(tmp_path / "gpu-tests.xml").getroot().find("testsuite")
        assert int(suite.get("tests")) >= 4 and suite.get("skipped") == suite.get("tests")


@pytest.mark.integration
def test_gpu_check_accuracy_dry_run_trains_the_quickstart_in_both_precisions_and_pairs_the_seeds(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPTS / "gpu-check"), "--dry-run", "--accuracy"],
                          env={**os.environ, "OUT": str(tmp_path)}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert {name: step["status"] for name, step in report["steps"].items()} == {
        "preflight": "ok", "install": "skipped", "quickstart_auto_seed0": "ok", "quickstart_fp32_seed0": "ok",
        "accuracy": "ok"}
    trained = {precision: json.loads((tmp_path / f"quickstart_{precision}.json").read_text())["spec"]
               for precision in ("auto", "fp32")}
    assert {precision: spec["model"]["precision"] for precision, spec in trained.items()} == {"auto": "auto",
                                                                                             "fp32": "fp32"}
    assert trained["fp32"]["data"]["shards"].endswith("/accuracy-auto/shards")  # prepared once, by the first run
    paired = report["accuracy"]["paired"]
    assert set(paired) >= {"teacher", "student", "baseline"} and all(len(rows) == 1 for rows in paired.values())
    assert all(row["bf16_minus_fp32"] == row["bf16"] - row["fp32"] for rows in paired.values() for row in rows)
