import pytest
import torch

from d3d_cluster.models import S3DG
from d3d_cluster.models.s3dg import MaxPool3d, SelfGating, scaled_channels

# Inception-v1 / I3D widths, restated here so the tests do not trust the model's table:
# (b0, b1_reduce, b1_out, b2_reduce, b2_out, b3) for Mixed_3b .. Mixed_5c.
INCEPTION_V1 = [
    (64, 96, 128, 16, 32, 32),
    (128, 128, 192, 32, 96, 64),
    (192, 96, 208, 16, 48, 64),
    (160, 112, 224, 24, 64, 64),
    (128, 128, 256, 24, 64, 64),
    (112, 144, 288, 32, 64, 64),
    (256, 160, 320, 32, 128, 128),
    (256, 160, 320, 32, 128, 128),
    (384, 192, 384, 48, 128, 128),
]


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def gated_channels(width: float = 1.0) -> list[int]:
    """Conv_2c output, then the four branch outputs of every Inception block."""
    per_block = [c for b0, _, b1, _, b2, b3 in INCEPTION_V1 for c in (b0, b1, b2, b3)]
    return [scaled_channels(c, width) for c in [192, *per_block]]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_ungated_full_width_matches_torchvision_s3d_param_count():
    assert n_params(S3DG(400, in_channels=3, width=1.0, gating=False)) == 8_320_048


@pytest.mark.parametrize("width", [1.0, 0.25])
def test_gating_adds_c_squared_plus_c_per_gated_layer(width):
    ungated = n_params(S3DG(400, width=width, gating=False))
    gated = S3DG(400, width=width, gating=True)
    expected = sum(c * c + c for c in gated_channels(width))
    assert n_params(gated) == ungated + expected
    gates = [m for m in gated.modules() if isinstance(m, SelfGating)]
    assert [g.fc.in_features for g in gates] == gated_channels(width)


def test_gate_saturates_between_zero_and_identity():
    gate = SelfGating(4)
    x = torch.randn(2, 4, 3, 5, 5)
    with torch.no_grad():
        gate.fc.weight.zero_()
        gate.fc.bias.fill_(-100.0)
    assert gate(x).abs().max() < 1e-30
    with torch.no_grad():
        gate.fc.bias.fill_(100.0)
    torch.testing.assert_close(gate(x), x)


@pytest.mark.parametrize("in_channels", [3, 2])
def test_rgb_and_flow_logits_and_features_shapes(in_channels):
    model = S3DG(6, in_channels=in_channels, width=0.25).eval()
    x = torch.randn(2, in_channels, 16, 56, 56)
    with torch.no_grad():
        assert model(x).shape == (2, 6)
        assert model.features(x).shape == (2, model.num_features)
    assert model.num_features == 96 + 96 + 32 + 32  # Mixed_5c branches 384, 384, 128, 128 / 4


@pytest.mark.parametrize("frames", [16, 32, 64])
def test_clip_lengths(frames):
    model = S3DG(5, in_channels=2, width=0.25).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 2, frames, 32, 32)).shape == (1, 5)


def test_full_width_full_resolution_clip():
    model = S3DG(400).eval()
    x = torch.randn(1, 3, 64, 224, 224)
    with torch.no_grad():
        assert model.base(x).shape == (1, 1024, 8, 7, 7)


def test_scaled_channels_rounds_to_multiple_of_eight_with_floor_of_eight():
    assert scaled_channels(192, 1.0) == 192
    assert scaled_channels(208, 0.25) == 56  # 52 is a tie, rounds up
    assert scaled_channels(192, 0.25) == 48
    assert scaled_channels(16, 0.25) == 8
    assert scaled_channels(24, 0.1) == 8
    assert scaled_channels(64, 0.5) == 32


def test_width_multiplier_scales_every_conv():
    full, quarter = S3DG(10, width=1.0), S3DG(10, width=0.25)
    full_convs = [m for m in full.modules() if isinstance(m, torch.nn.Conv3d)]
    quarter_convs = [m for m in quarter.modules() if isinstance(m, torch.nn.Conv3d)]
    assert len(full_convs) == len(quarter_convs)
    for f, q in zip(full_convs[:-1], quarter_convs[:-1]):
        assert q.out_channels == scaled_channels(f.out_channels, 0.25)
        assert q.out_channels % 8 == 0
    assert full.num_features == 1024 and quarter.num_features == 256
    assert full_convs[-1].out_channels == quarter_convs[-1].out_channels == 10


def test_backward_reaches_every_parameter():
    model = S3DG(4, in_channels=2, width=0.25, dropout=0.5).train()
    logits = model(torch.randn(2, 2, 8, 32, 32))
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 3])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []


POOLS = [  # (kernel, stride, padding, ceil_mode): every pool S3D-G has, and odd sizes for the ceil rule
    ((1, 3, 3), (1, 2, 2), (0, 1, 1), False),
    (3, 1, 1, False),
    (3, 2, 1, False),
    (2, 2, 0, True),
]


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("shape", [(2, 5, 8, 14, 14), (1, 3, 7, 9, 11)])
@pytest.mark.parametrize("kernel, stride, padding, ceil_mode", POOLS)
def test_separable_max_pool_gives_max_pool3d_values_and_gradients(kernel, stride, padding, ceil_mode, shape,
                                                                 channels_last):
    x = torch.randn(shape, dtype=torch.float64)  # no ties: the gradient's route is unique
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    ours, reference = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = MaxPool3d(kernel, stride, padding, ceil_mode)(ours)
    expected = torch.nn.MaxPool3d(kernel, stride, padding, ceil_mode=ceil_mode)(reference)
    assert out.shape == expected.shape and torch.equal(out, expected)
    upstream = torch.randn(expected.shape, dtype=torch.float64)
    out.backward(upstream)
    expected.backward(upstream)
    assert torch.equal(ours.grad != 0, reference.grad != 0)  # the same inputs receive gradient
    torch.testing.assert_close(ours.grad, reference.grad, rtol=1e-12, atol=1e-12)  # summed in another order


def test_every_pool_of_the_network_is_the_separable_one():
    pools = [m for m in S3DG(3, width=0.25).modules() if isinstance(m, torch.nn.MaxPool3d)]
    assert len(pools) == 13 and all(type(m) is MaxPool3d for m in pools)


def test_batchnorm_uses_tf_epsilon():
    bns = [m for m in S3DG(3, width=0.25).modules() if isinstance(m, torch.nn.BatchNorm3d)]
    assert bns and all(bn.eps == 1e-3 for bn in bns)


@pytest.mark.parametrize("kwargs", [{"width": 0.0}, {"num_classes": 0}, {"in_channels": 0}])
def test_invalid_construction_refused(kwargs):
    args = {"num_classes": 3, **kwargs}
    with pytest.raises(ValueError):
        S3DG(**args)
