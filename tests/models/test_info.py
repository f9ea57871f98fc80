import pytest

from d3d_cluster.models.info import model_info

# torchvision lists S3D (no gating, 400 classes) at 8,320,048 parameters and 17.979 "GFLOPS" for a
# 16x224x224 clip: multiply-adds, the same convention as the S3D-G paper's FLOPs.
TORCHVISION_S3D_PARAMS = 8_320_048
TORCHVISION_S3D_GMACS_16x224 = 17.979


def test_ungated_s3d_matches_torchvision_parameters_and_multiply_adds():
    info = model_info(400, 3, frames=16, size=224, gating=False)
    assert info.parameters == TORCHVISION_S3D_PARAMS
    assert info.multiply_adds / 1e9 == pytest.approx(TORCHVISION_S3D_GMACS_16x224, abs=5e-4)


def test_layer_costs_add_up_and_one_conv_matches_a_hand_count():
    info = model_info(400, 3, frames=64, size=224)
    layers = {layer.name: layer for layer in info.layers}
    assert sum(layer.multiply_adds for layer in info.layers) == info.multiply_adds
    # conv_2b: a 1x1x1 conv, 64 -> 64 channels, on a 32x56x56 map.
    assert layers["conv_2b"].output_shape == (64, 32, 56, 56)
    assert layers["conv_2b"].multiply_adds == 64 * 64 * 32 * 56 * 56
    assert layers["conv_2b"].parameters == 64 * 64 + 2 * 64  # conv + BatchNorm affine
    assert layers["head"].output_shape == (400,) and layers["head"].multiply_adds == 1024 * 400
    assert layers["pool_2a"].multiply_adds == 0


@pytest.mark.parametrize("frames, mixed_5c", [(16, (1024, 2, 7, 7)), (32, (1024, 4, 7, 7)), (64, (1024, 8, 7, 7))])
def test_feature_map_shape_for_16_32_and_64_frames(frames, mixed_5c):
    info = model_info(400, 3, frames=frames, size=224)
    layers = {layer.name: layer for layer in info.layers}
    assert layers["mixed_5c"].output_shape == mixed_5c
    assert layers["conv_1a"].output_shape == (64, frames // 2, 112, 112)


def test_gating_costs_parameters_but_almost_no_multiply_adds():
    gated, plain = model_info(400, 3, 64, 224, gating=True), model_info(400, 3, 64, 224, gating=False)
    assert gated.parameters - plain.parameters == 1_225_008
    assert 0 < gated.multiply_adds - plain.multiply_adds == 1_225_008 - sum(
        c for c in [192] + [64, 128, 32, 32, 128, 192, 96, 64, 192, 208, 48, 64, 160, 224, 64, 64, 128, 256, 64, 64,
                            112, 288, 64, 64, 256, 320, 128, 128, 256, 320, 128, 128, 384, 384, 128, 128])


def test_flow_input_changes_only_the_first_conv():
    rgb, flow = model_info(400, 3, 16, 112), model_info(400, 2, 16, 112)
    assert rgb.parameters - flow.parameters == 64 * 7 * 7
    assert [l.name for l in rgb.layers if l != flow.layers[rgb.layers.index(l)]] == ["conv_1a"]
