import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from click.testing import CliRunner
from conftest import finish_stage, tiny_spec
from onnx import numpy_helper
from safetensors.torch import load_file

import d3d_cluster
from d3d_cluster.cli import main
from d3d_cluster.data.schema import Manifest
from d3d_cluster.rundir import RunDir
from d3d_cluster.models import S3DG
from d3d_cluster.spec import load_spec
from d3d_cluster.train.export import _validation_clips, export_stage
from d3d_cluster.train.onnx_export import BadOnnx, check_onnx


def _finished_student(workdir, tiny_shards):
    spec = tiny_spec(workdir, name="exported", data={"shards": str(tiny_shards), "clip_frames": 8, "crop_size": 24,
                                                     "batch_size": 2},
                     model={"width": 0.5, "gating": False, "dropout": 0.2})
    run = RunDir.create(spec)
    return run, finish_stage(run, "student", seed=3)


@pytest.fixture
def finished_student(tmp_path, tiny_shards):
    return _finished_student(tmp_path / "work", tiny_shards)


@pytest.fixture(scope="module")
def onnx_exported(tmp_path_factory, tiny_shards):
    """A finished student (gated, as the quickstart's) exported by `d3dc export --format onnx`: the run, its network,
    the command's output and the export directory."""
    workdir = tmp_path_factory.mktemp("onnx")
    spec = tiny_spec(workdir, name="onnx", data={"shards": str(tiny_shards), "clip_frames": 8, "crop_size": 24,
                                                 "batch_size": 2, "eval_clips": 2})
    run = RunDir.create(spec)
    network = finish_stage(run, "student", seed=5)
    result = CliRunner().invoke(main, ["export", str(run.path), "--format", "onnx", "--out", str(workdir / "export")])
    assert result.exit_code == 0, result.output
    return run, network, result.stdout, workdir / "export"


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


def test_onnx_export_has_a_free_batch_axis_and_reproduces_the_pytorch_logits_of_validation_clips(onnx_exported):
    run, network, printed, out = onnx_exported
    info = json.loads((out / "model.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == sorted(["student.pt", "student.safetensors", "student.onnx",
                                                            "spec.yaml", "model.json"])
    check = info["onnx"]["check"]
    assert info["onnx"]["file"] == "student.onnx" and info["onnx"]["shape"] == ["batch", 3, 8, 24, 24]
    assert check["split"] == "val" and check["clips"] == 8 and check["tolerance"] == 1e-4  # 6 videos x 2 clips
    assert 0 <= check["max_abs_logit_difference"] <= 1e-4
    assert f"on 8 validation clips: largest logit difference {check['max_abs_logit_difference']:.2g}" in printed
    assert info["input"]["layout"] == "N, C, T, H, W" and info["input"]["mean"] and info["input"]["std"]
    exported_from = str(Path(d3d_cluster.__file__).resolve().parent.parent).encode()
    assert exported_from not in (out / "student.onnx").read_bytes()  # no stack traces naming this machine's files

    session = onnxruntime.InferenceSession(str(out / "student.onnx"))  # as a serving stack would, on its own
    [given] = session.get_inputs()
    assert given.name == "clips" and given.shape == ["batch", 3, 8, 24, 24]
    clips = _validation_clips(run.spec(), "rgb")
    with torch.no_grad():
        expected = network(clips).numpy()
    for batch in (1, 3, 8):
        got = session.run(None, {"clips": clips[:batch].numpy()})[0]
        assert np.abs(got - expected[:batch]).max() <= 1e-4


def test_the_onnx_check_refuses_a_tampered_file_other_weights_and_a_file_that_is_no_onnx(onnx_exported, tmp_path):
    run, network, _, out = onnx_exported
    clips = _validation_clips(run.spec(), "rgb")
    assert check_onnx(out / "student.onnx", network, clips)["max_abs_logit_difference"] <= 1e-4

    model = onnx.load(str(out / "student.onnx"))
    bias = next(tensor for tensor in model.graph.initializer if tensor.name == "classifier.bias")
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + 1e-3, bias.name))
    onnx.save(model, str(tmp_path / "tampered.onnx"))
    with pytest.raises(BadOnnx, match=r"tampered.onnx: onnxruntime's logits differ from PyTorch's by up to 0.001 on "
                                      r"8 clips \(tolerance 0.0001\): the file does not compute this network"):
        check_onnx(tmp_path / "tampered.onnx", network, clips)

    other = finish_stage(run, "baseline", seed=6)  # the same architecture, other weights
    with pytest.raises(BadOnnx, match="differ from PyTorch's by up to"):
        check_onnx(out / "student.onnx", other, clips)

    (tmp_path / "garbage.onnx").write_bytes(b"not a model")
    with pytest.raises(BadOnnx, match="garbage.onnx: onnxruntime cannot load it"):
        check_onnx(tmp_path / "garbage.onnx", network, clips)


def test_an_export_without_onnx_removes_an_earlier_onnx_file_of_other_weights(onnx_exported, tmp_path):
    run, _, _, out = onnx_exported
    again = tmp_path / "again"
    again.mkdir()
    (again / "student.onnx").write_bytes((out / "student.onnx").read_bytes())
    export_stage(run, "student", again)
    assert not (again / "student.onnx").exists() and "onnx" not in json.loads((again / "model.json").read_text())
