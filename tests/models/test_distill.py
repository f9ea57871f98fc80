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
    with pytest.raises(ValueError, match="do not match"):
        d3d_loss(student, labels, torch.randn(4, 6), 1.0)
