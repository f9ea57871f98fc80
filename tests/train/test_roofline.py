"""The roofline's counts: each rule on single operations, then a whole S3D-G step on the meta device."""

import json

import pytest
import torch
from click.testing import CliRunner

from d3d_cluster.cli import main
from d3d_cluster.models.info import model_info
from d3d_cluster.spec import DistillSpec
from d3d_cluster.train.roofline import CARDS, HEAD, LOSS, TEACHER, WEIGHTS, _Recorder, training_step

SMALL = dict(num_classes=5, frames=8, size=32, width=0.25, batch_size=2)


def _record(run):
    with _Recorder(lambda: "part") as recorder:
        run()
    return recorder.operations["part"]


def test_a_convolution_moves_its_input_weights_and_output_once_and_its_flops_are_twice_its_multiply_adds():
    x = torch.empty(2, 4, 3, 5, 5, device="meta", dtype=torch.bfloat16)
    weight = torch.empty(6, 4, 1, 3, 3, device="meta", dtype=torch.bfloat16)
    [conv] = _record(lambda: torch.nn.functional.conv3d(x, weight, padding=(0, 1, 1)))
    output_elements = 2 * 6 * 3 * 5 * 5
    assert conv.bytes_unfused == conv.bytes_fused == 2 * (x.numel() + weight.numel() + output_elements)
    assert conv.flops == 2 * output_elements * 4 * 9 and not conv.backward


def test_views_move_nothing_and_batchnorm_and_relu_vanish_only_when_fused():
    x = torch.empty(2, 4, 3, 5, 5, device="meta", dtype=torch.bfloat16)
    assert _record(lambda: x.view(2, -1).transpose(0, 1)) == []
    mean, var = torch.zeros(4, device="meta"), torch.ones(4, device="meta")
    operations = _record(lambda: torch.relu_(torch.nn.functional.batch_norm(x, mean, var, training=True)))
    assert [op.bytes_fused for op in operations] == [0, 0]
    assert operations[-1].bytes_unfused == 2 * 2 * x.numel()  # in place: read and written
    [add] = _record(lambda: x + x)
    assert add.bytes_fused == add.bytes_unfused == 3 * 2 * x.numel()


def test_a_teacher_step_charges_every_layer_forward_and_backward_and_its_forward_is_the_model_info_count():
    step = training_step("teacher", **SMALL)
    info = model_info(5, 2, 8, 32, 0.25)
    assert step.total("forward_flops") == pytest.approx(2 * info.multiply_adds)
    parts = {part.name: part for part in step.parts}
    layers = [layer.name for layer in info.layers if layer.name != "head"]
    assert [name for name in parts if name in layers] == layers
    for name in layers:
        assert parts[name].bytes_unfused > 0 and parts[name].bytes_fused <= parts[name].bytes_unfused
        if not name.startswith("pool"):
            assert 0 < parts[name].backward_flops <= 2 * parts[name].forward_flops + 1, name
    assert parts[HEAD].backward_flops > 0 and TEACHER not in parts
    parameters = sum(layer.parameters for layer in info.layers)
    assert parts[WEIGHTS].bytes_unfused == pytest.approx(40 * parameters / SMALL["batch_size"])
    activations = [part for part in step.parts if part.name != WEIGHTS]
    assert sum(part.bytes_fused for part in activations) < 0.8 * sum(part.bytes_unfused for part in activations)


def test_the_students_step_runs_its_frozen_teacher_forward_only_as_far_as_the_distillation_reads():
    teacher = training_step("teacher", **SMALL)
    paper = {part.name: part for part in training_step("student", **SMALL).parts}
    assert paper[TEACHER].forward_flops == pytest.approx(teacher.total("forward_flops"))
    assert paper[TEACHER].backward_flops == 0
    conv_2c = {part.name: part for part in training_step("student", **SMALL, distill=DistillSpec()).parts}
    assert 0 < conv_2c[TEACHER].forward_flops < paper[TEACHER].forward_flops
    assert conv_2c[LOSS].forward_flops == 0 < conv_2c[LOSS].bytes_unfused


def test_the_limits_are_the_cards_peaks_over_the_steps_bytes_and_flops_and_each_op_at_its_roof_is_slower():
    step = training_step("teacher", **SMALL)
    h100 = step.limits(CARDS["h100"])
    assert h100["memory_unfused"] == pytest.approx(3.35e12 / step.total("bytes_unfused"))
    assert h100["compute"] == pytest.approx(989e12 / step.total("flops"))
    assert h100["per_operation_unfused"] <= min(h100["memory_unfused"], h100["compute"]) * (1 + 1e-12)
    assert h100["per_operation_unfused"] <= h100["per_operation_fused"]
    assert step.limits(CARDS["a100"])["memory_unfused"] < h100["memory_unfused"] < \
        step.limits(CARDS["h200"])["memory_unfused"]


def test_model_info_roofline_reports_both_steps_for_the_named_card():
    arguments = ["model-info", "--roofline", "--frames", "8", "--size", "32", "--width", "0.25", "--classes", "5",
                 "--batch", "2"]
    result = CliRunner().invoke(main, [*arguments, "--gpu", "a100", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["teacher"]["card"]["name"].startswith("A100") and report["student"]["batch"] == 2
    assert report["student"]["per_clip"]["flops"] > report["teacher"]["per_clip"]["flops"]
    table = CliRunner().invoke(main, [*arguments, "--stage", "student"])
    assert table.exit_code == 0 and "frozen teacher" in table.output and "H100" in table.output
