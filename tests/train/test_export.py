import json

import pytest
import torch
from click.testing import CliRunner
from conftest import finish_stage, tiny_spec
from safetensors.torch import load_file

from d3d_cluster.cli import main
from d3d_cluster.data.schema import Manifest
from d3d_cluster.rundir import RunDir
from d3d_cluster.models import S3DG
from d3d_cluster.spec import load_spec
from d3d_cluster.train.export import export_stage


@pytest.fixture
def finished_student(tmp_path, tiny_shards):
    spec = tiny_spec(tmp_path / "work", name="exported", data={"shards": str(tiny_shards), "clip_frames": 8,
                                                                 "crop_size": 24, "batch_size": 2},
                     model={"width": 0.5, "gating": False, "dropout": 0.2})
    run = RunDir.create(spec)
    return run, finish_stage(run, "student", seed=3)


def test_exported_torch_and_safetensors_files_rebuild_the_network_with_plain_torch(finished_student, tmp_path,
                                                                                   tiny_shards, monkeypatch):
    run, original = finished_student
    out = tmp_path / "export"
    files = export_stage(run, "student", out)
    assert {path.name for path in files.values()} == {"student.pt", "student.safetensors", "spec.yaml", "model.json"}
    assert sorted(p.name for p in out.iterdir()) == sorted(path.name for path in files.values())  # no temporary left

    info = json.loads((out / "model.json").read_text())
    spec = load_spec(out / "spec.yaml")
    assert spec == run.spec()
    assert info["classes"] == Manifest.load(tiny_shards).classes and info["num_classes"] == 3
    assert (info["stage"], info["in_channels"], info["input"]["modality"]) == ("student", 3, "rgb")
    assert info["model"] == spec.model.model_dump()
    assert info["s3dg"] == dict(num_classes=3, in_channels=3, width=0.5, gating=False, dropout=0.2)
    assert info["input"]["shape"] == [3, 8, 24, 24]

    clip = torch.randn(2, *info["input"]["shape"])
    with torch.no_grad():
        expected = original(clip)
        for state in (torch.load(out / "student.pt", weights_only=True), load_file(out / "student.safetensors")):
            assert all(t.dtype == torch.float32 for t in state.values() if t.is_floating_point())
            rebuilt = S3DG(**info["s3dg"]).eval()
            rebuilt.load_state_dict(state)
            assert torch.equal(rebuilt(clip), expected)

    monkeypatch.chdir(out)  # the three lines model.json gives, as a user would paste them
    namespace: dict = {}
    exec("\n".join(info["load"]), namespace)
    with torch.no_grad():
        assert torch.equal(namespace["model"](clip), expected)


def test_export_refuses_a_stage_that_has_not_finished_naming_the_file(finished_student):
    run, _ = finished_student
    with pytest.raises(FileNotFoundError, match=f"{run.path / 'teacher' / 'model.pt'}: stage teacher has not finished"):
        export_stage(run, "teacher", run.path / "export")
    assert not (run.path / "export").exists()


def test_export_command_writes_into_the_run_or_out_and_finds_the_run_by_name(finished_student, tmp_path):
    run, _ = finished_student
    result = CliRunner().invoke(main, ["export", str(run.path)])
    assert result.exit_code == 0, result.output
    assert (run.path / "export" / "student.safetensors").is_file() and "student.pt" in result.output
    elsewhere = tmp_path / "elsewhere"
    result = CliRunner().invoke(main, ["export", "exported", "--workdir", str(tmp_path / "work"), "--out", str(elsewhere)])
    assert result.exit_code == 0, result.output
    assert (elsewhere / "model.json").is_file()
    result = CliRunner().invoke(main, ["export", str(run.path), "--stage", "baseline"])
    assert result.exit_code != 0 and "baseline/model.pt: stage baseline has not finished training" in result.output
