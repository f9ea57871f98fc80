"""`d3dc predict` on raw video files, against the evaluation job's own prediction for the same videos: the same
views of the same frames (evaluation reads the shards; predict reads the source files and stores and decodes them as
the shards and the loader do)."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY, finish_stage, tiny_spec

from d3d_cluster.cli import main
from d3d_cluster.data.index import SampleTable
from d3d_cluster.data.schema import META_EXT, Manifest
from d3d_cluster.launch.pipeline import run_evaluation
from d3d_cluster.rundir import RunDir
from d3d_cluster.predict import ExportedModel
from d3d_cluster.train.evaluate import Predictions
from d3d_cluster.train.export import export_stage
from d3d_cluster.train.stages import EXPORT_NAME
from dataprep.video import read_video


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_shards):
    """A run of the tiny shards whose student finished with random weights and was evaluated with 2 clips x the
    centre crop, exported; and the source video of each validation sample."""
    workdir = tmp_path_factory.mktemp("predict")
    spec = tiny_spec(workdir, name="predict", data={**TINY["data"], "shards": str(tiny_shards), "eval_clips": 2,
                                                    "eval_crops": 1})
    run = RunDir.create(spec)
    network = finish_stage(run, "student", seed=3)
    table = SampleTable.of_split(Manifest.load(tiny_shards), tiny_shards, "val")
    sources = {key: tiny_shards.parent / "raw" / json.loads(bytes(table.read(i, META_EXT)))["source"]
               for i, key in enumerate(table.keys)}
    table.close()
    # Random weights with BatchNorm statistics of noise score every video alike. Statistics of these videos'
    # clips (and a larger classifier) make the scores follow the input, so that a wrong frame, crop or
    # normalisation in predict shows.
    clips = torch.cat([ExportedModel(network, [], spec, torch.device("cpu")).clips(*read_video(path), 2)
                       for path in sources.values()])
    network.train()
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.reset_running_stats()
                module.momentum = None  # a cumulative average over the passes
        network(clips)
        network.classifier.weight *= 3
    torch.save(network.state_dict(), run.path / "student" / EXPORT_NAME)
    run_evaluation(run, ("student",), echo=lambda line: None, poll_seconds=0.2)
    export_stage(run, "student", workdir / "export")
    return run, workdir / "export", sources


@pytest.mark.integration
def test_predict_on_the_source_videos_agrees_with_the_evaluation_of_their_shards(exported):
    run, export, sources = exported
    evaluated = Predictions.load(run.path / "student")
    model = ExportedModel.load(export)
    for key, logits in zip(evaluated.keys, evaluated.logits):
        probabilities = model.probabilities(sources[str(key)], clips=2)
        assert np.abs(probabilities - np.exp(logits)).max() < 1e-4, key
        assert probabilities.argmax() == logits.argmax(), key


@pytest.mark.integration
def test_d3dc_predict_prints_the_top_classes_and_json_and_names_a_video_it_cannot_read(exported, tmp_path):
    _, export, sources = exported
    videos = sorted(sources.values())[:2]
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    runner = CliRunner()

    shown = runner.invoke(main, ["predict", str(export), str(videos[0]), "--clips", "2", "--top", "2"])
    assert shown.exit_code == 0, shown.output
    assert videos[0].name in shown.output and "probability" in shown.output

    as_json = runner.invoke(main, ["predict", str(export), *map(str, videos), str(broken), "--json", "--top", "3"])
    assert as_json.exit_code == 1
    results = json.loads(as_json.output)
    assert [r["video"] for r in results] == [*map(str, videos), str(broken)]
    for result in results[:2]:
        assert len(result["top"]) == 3 and {row["class"] for row in result["top"]} == {"down", "sideways", "up"}
        assert sum(row["probability"] for row in result["top"]) == pytest.approx(1.0, abs=1e-5)
    assert str(broken) in results[2]["error"]


def test_predict_refuses_a_flow_network_saying_why(tmp_path):
    (tmp_path / "model.json").write_text(json.dumps({"stage": "teacher", "input": {"modality": "flow"}}))
    with pytest.raises(ValueError, match="reads flow; predict runs an RGB network"):
        ExportedModel.load(tmp_path)
