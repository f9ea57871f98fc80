import pytest
import torch
import torch.nn.functional as F

from d3d_cluster.data.pipeline import Batch
from d3d_cluster.models import S3DG, FeatureDistillation
from d3d_cluster.spec import DistillSpec, Spec
from d3d_cluster.train.stages import Stage, build_network


@pytest.fixture
def clips():
    torch.manual_seed(0)
    return Batch(rgb=torch.randn(2, 3, 8, 32, 32), flow=torch.randn(2, 2, 8, 32, 32), labels=torch.tensor([1, 2]),
                 samples=torch.tensor([0, 1]), views=torch.zeros(2, dtype=torch.long),
                 epochs=torch.zeros(2, dtype=torch.long))


@pytest.fixture
def teacher():
    torch.manual_seed(1)
    return S3DG(3, in_channels=2, width=0.25).eval().requires_grad_(False)


def _student(spec_distill: DistillSpec, teacher: S3DG) -> tuple[Stage, torch.nn.Module]:
    stage = Stage("student", "rgb", Spec().student, spec_distill, teacher)
    torch.manual_seed(2)
    return stage, stage.trainable(S3DG(3, in_channels=3, width=0.25))


def test_logit_mse_stage_loss_is_ce_plus_weighted_squared_error_by_hand(clips, teacher):
    stage, student = _student(DistillSpec(weight=0.7, target="logits"), teacher)
    logits = student(clips.rgb)
    loss = stage.loss(logits, clips)
    with torch.no_grad():
        teacher_logits = teacher(clips.flow)
    expected = F.cross_entropy(logits, clips.labels) + 0.7 * ((logits - teacher_logits) ** 2).mean()
    torch.testing.assert_close(loss.total, expected)


def test_kl_stage_loss_by_hand(clips, teacher):
    stage, student = _student(DistillSpec(weight=2.0, target="logits", loss="kl", temperature=4.0), teacher)
    logits = student(clips.rgb)
    with torch.no_grad():
        p_teacher = torch.softmax(teacher(clips.flow) / 4.0, dim=1)
    p_student = torch.softmax(logits / 4.0, dim=1)
    kl = (p_teacher * (p_teacher.log() - p_student.log())).sum(dim=1).mean() * 16.0
    torch.testing.assert_close(stage.loss(logits, clips).distillation, kl)


@pytest.mark.parametrize("layer", ["conv_2c", "mixed_4f", "mixed_5c"])
def test_feature_stage_matches_the_teachers_map_at_its_layer_and_trains_the_student_never_the_teacher(
        clips, teacher, layer):
    stage, student = _student(DistillSpec(target=layer), teacher)
    assert isinstance(student, FeatureDistillation)
    outputs = student(clips.rgb)
    torch.testing.assert_close(outputs[0], student.network(clips.rgb))  # the logits are the plain network's
    loss = stage.loss(outputs, clips)
    with torch.no_grad():
        teacher_map = teacher.endpoints(clips.flow, [layer])[layer]
        student_map = student.network.endpoints(clips.rgb, [layer])[layer]
        expected = ((student.projection(student_map) - teacher_map) ** 2).mean()
    torch.testing.assert_close(loss.distillation, expected)
    loss.total.backward()
    assert student.projection.weight.grad.abs().sum() > 0
    below = student.network.endpoint_names.index(layer) + 1
    assert all(p.grad is not None for p in student.network.base[:below].parameters())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not teacher.training


def test_logit_target_trains_the_plain_network(teacher):
    stage, student = _student(DistillSpec(target="logits"), teacher)
    assert type(student) is S3DG
    assert Stage("baseline", "rgb", Spec().student).trainable(student) is student


def test_build_network_applies_the_stage_init_file(tmp_path):
    torch.manual_seed(3)
    source = S3DG(4, in_channels=2, width=0.25)
    torch.save(source.state_dict(), tmp_path / "teacher-init.pt")
    spec = Spec().with_overrides(workdir=str(tmp_path), **{"teacher.init.path": "teacher-init.pt"})
    network = build_network(spec, spec.teacher, "flow", 4)
    assert all(torch.equal(a, b) for a, b in zip(network.state_dict().values(), source.state_dict().values()))
    plain = build_network(spec, spec.student, "rgb", 4)
    assert not torch.equal(plain.classifier.weight[:, :8], source.classifier.weight[:, :8])
