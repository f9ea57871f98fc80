import math

import pytest
import torch
import torch.nn.functional as F

from d3d_cluster.models import d3d_loss


@pytest.fixture
def batch():
    torch.manual_seed(0)
    return torch.randn(4, 5, requires_grad=True), torch.tensor([0, 4, 2, 1]), torch.randn(4, 5)


def test_weight_zero_is_plain_cross_entropy(batch):
    student, labels, teacher = batch
    ce = F.cross_entropy(student, labels)
    for loss in (d3d_loss(student, labels, teacher, 0.0), d3d_loss(student, labels, None, 3.0)):
        torch.testing.assert_close(loss.total, ce)
        torch.testing.assert_close(loss.cross_entropy, ce)
        assert loss.distillation.item() == 0.0


def test_hand_computed_case():
    student = torch.tensor([[2.0, 0.0]])
    teacher = torch.tensor([[1.0, 2.0]])
    loss = d3d_loss(student, torch.tensor([0]), teacher, weight=0.5)
    ce = -math.log(math.exp(2.0) / (math.exp(2.0) + 1.0))
    mse = ((2.0 - 1.0) ** 2 + (0.0 - 2.0) ** 2) / 2  # mean over all elements
    assert loss.cross_entropy.item() == pytest.approx(ce)
    assert loss.distillation.item() == pytest.approx(mse)
    assert loss.total.item() == pytest.approx(ce + 0.5 * mse)


def test_no_gradient_reaches_teacher(batch):
    student, labels, _ = batch
    teacher_net = torch.nn.Linear(3, 5)
    teacher_logits = teacher_net(torch.randn(4, 3))
    d3d_loss(student, labels, teacher_logits, weight=2.0).total.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher_net.parameters())


def test_distillation_gradient_pulls_student_towards_teacher():
    student = torch.zeros(1, 3, requires_grad=True)
    teacher = torch.tensor([[1.0, -1.0, 0.0]])
    d3d_loss(student, torch.tensor([2]), teacher, weight=1.0).distillation.backward()
    torch.testing.assert_close(student.grad, 2 * (student - teacher).detach() / 3)


@pytest.mark.parametrize("weight", [-0.1, float("nan")])
def test_invalid_weight_refused(batch, weight):
    student, labels, teacher = batch
    with pytest.raises(ValueError, match="weight must be"):
        d3d_loss(student, labels, teacher, weight)


def test_mismatched_teacher_shape_refused(batch):
    student, labels, _ = batch
    with pytest.raises(ValueError, match="does not match"):
        d3d_loss(student, labels, torch.randn(4, 6), 1.0)


def test_kl_with_temperature_is_hintons_scaled_kl_by_hand():
    student = torch.tensor([[1.0, 0.0, -1.0]])
    teacher = torch.tensor([[0.0, 2.0, 0.0]])
    temperature = 2.0
    p_t = [math.exp(v / temperature) for v in (0.0, 2.0, 0.0)]
    p_t = [v / sum(p_t) for v in p_t]
    p_s = [math.exp(v / temperature) for v in (1.0, 0.0, -1.0)]
    p_s = [v / sum(p_s) for v in p_s]
    kl = sum(t * math.log(t / s) for t, s in zip(p_t, p_s))
    loss = d3d_loss(student, torch.tensor([1]), teacher, weight=0.5, kind="kl", temperature=temperature)
    assert loss.distillation.item() == pytest.approx(kl * temperature**2, rel=1e-6)
    assert loss.total.item() == pytest.approx(loss.cross_entropy.item() + 0.5 * kl * temperature**2, rel=1e-6)


def test_kl_is_averaged_over_clips_and_zero_when_distributions_agree():
    student = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    same_up_to_shift = student + torch.tensor([[5.0], [-3.0]])
    loss = d3d_loss(student, torch.tensor([0, 1]), same_up_to_shift, 1.0, kind="kl", temperature=3.0)
    assert loss.distillation.item() == pytest.approx(0.0, abs=1e-6)
    one = d3d_loss(student[:1], torch.tensor([0]), torch.tensor([[2.0, 0.0]]), 1.0, kind="kl").distillation
    two = d3d_loss(student[:1].repeat(2, 1), torch.tensor([0, 0]), torch.tensor([[2.0, 0.0]] * 2), 1.0,
                   kind="kl").distillation
    torch.testing.assert_close(one, two)


def test_feature_target_matches_student_output_not_logits_by_hand():
    logits = torch.tensor([[3.0, 0.0]])
    projected = torch.tensor([[[[[1.0]]], [[[2.0]]]]])  # (1, 2, 1, 1, 1)
    teacher_map = torch.tensor([[[[[0.0]]], [[[4.0]]]]])
    loss = d3d_loss(logits, torch.tensor([0]), teacher_map, 2.0, student_output=projected)
    assert loss.distillation.item() == pytest.approx((1.0 + 4.0) / 2)
    assert loss.total.item() == pytest.approx(F.cross_entropy(logits, torch.tensor([0])).item() + 2.0 * 2.5)


def test_feature_distillation_trains_student_and_projection_never_the_teacher():
    from d3d_cluster.models import FeatureDistillation, S3DG

    torch.manual_seed(0)
    teacher = S3DG(3, in_channels=2, width=0.25).eval().requires_grad_(False)
    student = FeatureDistillation(S3DG(3, in_channels=3, width=0.25), teacher.num_features)
    rgb, flow = torch.randn(2, 3, 8, 32, 32), torch.randn(2, 2, 8, 32, 32)
    logits, projected = student(rgb)
    with torch.no_grad():
        teacher_map = teacher.feature_map(flow)
    assert projected.shape == teacher_map.shape == (2, teacher.num_features, 1, 1, 1)
    d3d_loss(logits, torch.tensor([0, 2]), teacher_map, 1.0, student_output=projected).total.backward()
    assert student.projection.weight.grad.abs().sum() > 0 and student.projection.bias.grad.abs().sum() > 0
    assert student.network.base.conv_1a[0][0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert set(student.network.state_dict()) == set(S3DG(3, width=0.25).state_dict())


def test_unknown_kind_and_bad_temperature_refused(batch):
    student, labels, teacher = batch
    with pytest.raises(ValueError, match="unknown distillation loss 'l1'"):
        d3d_loss(student, labels, teacher, 1.0, kind="l1")
    with pytest.raises(ValueError, match="temperature must be"):
        d3d_loss(student, labels, teacher, 1.0, kind="kl", temperature=0.0)
