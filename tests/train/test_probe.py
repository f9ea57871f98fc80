import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from click.testing import CliRunner
from conftest import tiny_spec

from d3d_cluster.cli import main
from d3d_cluster.rundir import RunDir
from d3d_cluster.models import S3DG
from d3d_cluster.spec import ProbeSpec
from d3d_cluster.data.pipeline import Batch
from d3d_cluster.train.probe import MotionProbe, end_point_error, run_probe


@pytest.fixture
def run_with_student(tmp_path, tiny_shards):
    spec = tiny_spec(tmp_path, data={"shards": str(tiny_shards), "clip_frames": 8, "crop_size": 24, "batch_size": 2},
                     probe={"epochs": 1, "views": 1, "layers": ["conv_2c", "mixed_3c", "mixed_5c"]})
    run = RunDir.create(spec)
    torch.manual_seed(0)
    torch.save(S3DG(3, in_channels=3, width=spec.model.width).state_dict(), run.stage("student") / "model.pt")
    return run


def test_end_point_error_by_hand():
    predicted = torch.zeros(1, 2, 1, 1, 2)
    target = torch.tensor([3.0, 0.0, 4.0, 1.0]).reshape(1, 2, 1, 1, 2)  # vectors (3, 4) and (0, 1)
    assert end_point_error(predicted, target).item() == pytest.approx((5.0 + 1.0) / 2)


def test_probe_cli_prints_and_writes_one_sane_row_per_layer(run_with_student):
    result = CliRunner().invoke(main, ["probe", str(run_with_student.path), "--stage", "student"])
    assert result.exit_code == 0, result.output
    for layer in ("conv_2c", "mixed_3c", "mixed_5c"):
        assert layer in result.output
    report = json.loads((run_with_student.path / "student" / "probe.json").read_text())
    assert [row["layer"] for row in report["layers"]] == ["conv_2c", "mixed_3c", "mixed_5c"]
    assert report["input"] == "rgb" and report["val_samples"] == 6 and len(report["train_epe_per_epoch"]) == 1
    resolutions = [tuple(row["resolution"]) for row in report["layers"]]
    assert resolutions == [(4, 6, 6), (4, 3, 3), (1, 1, 1)]
    bound = 20.0  # prep.flow.bound: no flow vector is longer than bound * sqrt(2) pixels
    for row in report["layers"]:
        assert math.isfinite(row["epe"]) and 0 <= row["epe"] < 10 * bound
        assert 0 < row["zero_flow_epe"] <= bound * math.sqrt(2)


def test_probe_of_an_untrained_stage_is_refused_naming_the_file(run_with_student):
    with pytest.raises(FileNotFoundError, match="teacher/model.pt: no exported network; train the teacher stage"):
        run_probe(run_with_student.path, "teacher")


class _SparseMotion:
    """Clips whose flow is one square patch moving on a still background, as a loader hands them out."""

    first_epoch = 0

    def __init__(self, batches: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.batches = []
        for _ in range(batches):
            flow = torch.zeros(8, 2, 4, 16, 16)
            for clip in flow:
                y, x = torch.randint(0, 10, (2,), generator=generator).tolist()
                clip[:, :, y:y + 6, x:x + 6] = (torch.rand(2, generator=generator) * 2 - 1)[:, None, None, None]
            self.batches.append(Batch(None, flow, torch.zeros(8, dtype=torch.long), torch.arange(8),
                                      torch.zeros(8, dtype=torch.long), torch.zeros(8, dtype=torch.long)))

    @property
    def steps_per_epoch(self) -> int:
        return len(self.batches)

    def epoch(self, epoch: int):
        return iter(self.batches)


class _Layer(nn.Module):
    """A frozen network of one layer at half resolution: the flow itself among noise channels, or noise only."""

    def __init__(self, carries_flow: bool):
        super().__init__()
        self.carries_flow = carries_flow
        self.passes = 0  # batches it has run on

    def endpoints(self, clips: torch.Tensor, layers: list[str]) -> dict[str, torch.Tensor]:
        self.passes += 1
        noise = torch.randn(len(clips), 6, 4, 8, 8)
        flow = F.avg_pool3d(clips, (1, 2, 2))
        return {layers[0]: torch.cat([flow, noise], 1) if self.carries_flow else noise}


@pytest.mark.parametrize("carries_flow", [True, False])
def test_the_probe_decodes_flow_only_from_features_that_carry_it_and_never_ends_worse_than_zero_flow(carries_flow):
    torch.manual_seed(0)
    probe = MotionProbe(_Layer(carries_flow), "flow", ["layer"], flow_bound=20.0, hidden=ProbeSpec().hidden,
                        device=torch.device("cpu"))
    settings = ProbeSpec()  # the shipped defaults
    probe.train(_SparseMotion(batches=4, seed=1), epochs=settings.epochs, lr=settings.lr, views=settings.views)
    row, = probe.evaluate(_SparseMotion(batches=4, seed=2))
    ratio = row.epe / row.zero_flow_epe
    if carries_flow:
        assert ratio < 0.3, ratio
    else:
        assert 0.9 < ratio < 1.1, ratio


@pytest.mark.parametrize("views, passes", [(2, 2 * 4), (None, 6 * 4)])
def test_the_frozen_network_runs_once_per_kept_view_however_many_decoder_epochs(views, passes):
    network = _Layer(carries_flow=True)
    probe = MotionProbe(network, "flow", ["layer"], flow_bound=20.0, hidden=8, device=torch.device("cpu"))
    history = probe.train(_SparseMotion(batches=4, seed=1), epochs=6, lr=1e-2, views=views)
    assert network.passes == passes and len(history) == 6


def test_kept_views_that_outgrow_free_memory_are_refused_naming_the_setting(monkeypatch):
    probe = MotionProbe(_Layer(carries_flow=True), "flow", ["layer"], flow_bound=20.0, hidden=8,
                        device=torch.device("cpu"))
    monkeypatch.setattr("d3d_cluster.train.probe.os.sysconf", lambda name: 64 if name == "SC_AVPHYS_PAGES" else 4096)
    with pytest.raises(MemoryError, match="probe.views keeps .* GiB of features of layer .*probe.views: null"):
        probe.train(_SparseMotion(batches=4, seed=1), epochs=6, lr=1e-2, views=2)
