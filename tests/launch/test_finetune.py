"""Fine-tuning across class counts, as D3D's UCF-101 and HMDB-51 results start from Kinetics networks: a stage
of the tiny 3-class shards starts from the exported teacher of a 5-class run, through the real job path."""

import pytest
import torch
from conftest import TINY, tiny_spec

from d3d_cluster.launch.pipeline import run_stage
from d3d_cluster.rundir import RunDir
from d3d_cluster.models import S3DG
from d3d_cluster.train.stages import EXPORT_NAME


@pytest.mark.integration
def test_a_teacher_fine_tuned_from_a_five_class_teacher_keeps_its_layers_and_learns_a_fresh_classifier(
        tmp_path, tiny_shards):
    source = S3DG(5, in_channels=2, width=0.25).state_dict()  # what a 5-class run's teacher exported
    torch.save(source, tmp_path / "five-class-teacher.pt")
    # A learning rate too small to move the loaded layers measurably: the export then shows where they started.
    spec = tiny_spec(tmp_path, name="finetune", data={**TINY["data"], "shards": str(tiny_shards)},
                     teacher={"epochs": 1, "optimizer": {"lr": 1e-9, "weight_decay": 0.0},
                              "init": {"path": "five-class-teacher.pt", "head": "reinit"}})
    run = RunDir.create(spec)
    output: list[str] = []

    run_stage(run, "teacher", echo=output.append)

    initialised = [e for e in run.events() if e["event"] == "initialised"]
    assert len(initialised) == 1 and initialised[0]["stage"] == "teacher"
    assert initialised[0]["reinitialised"] == ["classifier.bias", "classifier.weight"]
    assert initialised[0]["skipped"] == ["classifier.bias (5,)", "classifier.weight (5, 256, 1, 1, 1)"]
    assert any("init: " in line and "freshly initialised (2)" in line for line in output)
    trained = torch.load(run.path / "teacher" / EXPORT_NAME)
    assert trained["classifier.weight"].shape == (3, 256, 1, 1, 1)
    for key, value in source.items():
        if not key.startswith("classifier.") and value.is_floating_point() and "running_" not in key:
            assert torch.allclose(trained[key], value, atol=1e-6), key
