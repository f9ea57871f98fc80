import pytest
import torch
from torch import nn

from d3d_cluster.models import S3DG
from d3d_cluster.models.s3dg import SelfGating
from d3d_cluster.models.weights import WeightsError, inflate_inception_v1, load_s3dg, load_weights

# Inception-v1 widths (b0, b1_reduce, b1, b2_reduce, b2, b3), restated for the 2D reference below.
BLOCKS_2D = {
    "inception3a": (192, (64, 96, 128, 16, 32, 32)),
    "inception3b": (256, (128, 128, 192, 32, 96, 64)),
    "inception4a": (480, (192, 96, 208, 16, 48, 64)),
    "inception4b": (512, (160, 112, 224, 24, 64, 64)),
    "inception4c": (512, (128, 128, 256, 24, 64, 64)),
    "inception4d": (512, (112, 144, 288, 32, 64, 64)),
    "inception4e": (528, (256, 160, 320, 32, 128, 128)),
    "inception5a": (832, (256, 160, 320, 32, 128, 128)),
    "inception5b": (832, (384, 192, 384, 48, 128, 128)),
}
ENDPOINTS = {"conv1": "conv_1a", "conv2": "conv_2b", "conv3": "conv_2c", "inception3a": "mixed_3b",
             "inception3b": "mixed_3c", "inception4a": "mixed_4b", "inception4e": "mixed_4f",
             "inception5a": "mixed_5b", "inception5b": "mixed_5c"}


class Basic2d(nn.Module):
    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class Inception2d(nn.Module):
    def __init__(self, cin, widths):
        super().__init__()
        b0, b1a, b1, b2a, b2, b3 = widths
        self.branch1 = Basic2d(cin, b0, 1)
        self.branch2 = nn.Sequential(Basic2d(cin, b1a, 1), Basic2d(b1a, b1, 3, padding=1))
        self.branch3 = nn.Sequential(Basic2d(cin, b2a, 1), Basic2d(b2a, b2, 3, padding=1))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), Basic2d(cin, b3, 1))

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class GoogLeNet2d(nn.Module):
    """Inception-v1 in the common PyTorch naming, with TF-slim's "SAME" pooling geometry (as S3D-G)."""

    def __init__(self):
        super().__init__()
        self.conv1 = Basic2d(3, 64, 7, 2, 3)
        self.conv2 = Basic2d(64, 64, 1)
        self.conv3 = Basic2d(64, 192, 3, padding=1)
        for name, (cin, widths) in BLOCKS_2D.items():
            setattr(self, name, Inception2d(cin, widths))
        self.fc = nn.Linear(1024, 1000)
        self.aux1 = nn.Linear(4, 4)  # auxiliary heads: present in ImageNet checkpoints, ignored

    def activations(self, x):
        pool = {"conv1": nn.MaxPool2d(3, 2, 1), "conv3": nn.MaxPool2d(3, 2, 1),
                "inception3b": nn.MaxPool2d(3, 2, 1), "inception4e": nn.MaxPool2d(2, 2, ceil_mode=True)}
        out = {}
        for name in ["conv1", "conv2", "conv3", *BLOCKS_2D]:
            x = getattr(self, name)(x)
            out[name] = x
            if name in pool:
                x = pool[name](x)
        return out


def random_googlenet(seed=0) -> GoogLeNet2d:
    torch.manual_seed(seed)
    net = GoogLeNet2d()
    for bn in (m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.1)
            bn.running_mean.normal_(0, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
    return net.eval()


@pytest.fixture(scope="module")
def googlenet_file(tmp_path_factory):
    net = random_googlenet()
    path = tmp_path_factory.mktemp("weights") / "googlenet.pt"
    torch.save(net.state_dict(), path)
    return net, path


def test_inflated_network_sees_a_constant_clip_as_the_2d_network_sees_its_frame(googlenet_file):
    net2d, path = googlenet_file
    model = S3DG(400, in_channels=3, gating=False)
    inflate_inception_v1(model, path)
    model.eval()
    frame = torch.randn(2, 3, 64, 64)
    clip = frame[:, :, None].expand(2, 3, 4, 64, 64)
    with torch.no_grad():
        expected = net2d.activations(frame)
        got = model.endpoints(clip, ENDPOINTS.values())
    for name2d, name3d in ENDPOINTS.items():
        assert got[name3d].shape[3:] == expected[name2d].shape[2:]
        for t in range(got[name3d].shape[2]):  # every frame, the temporal borders included
            torch.testing.assert_close(got[name3d][:, :, t], expected[name2d], rtol=1e-4, atol=1e-4,
                                       msg=f"{name3d} frame {t}")


def test_flow_network_takes_the_rgb_first_kernel_averaged_over_channels(googlenet_file):
    net2d, path = googlenet_file
    model = S3DG(5, in_channels=2)
    inflate_inception_v1(model, path)
    rgb_kernel = net2d.conv1.conv.weight
    first = model.base.conv_1a[0][0].weight
    assert first.shape == (64, 2, 1, 7, 7)
    for channel in range(2):
        torch.testing.assert_close(first[:, channel, 0], rgb_kernel.mean(dim=1))


def test_gates_and_classifier_keep_their_fresh_initialisation(googlenet_file):
    _, path = googlenet_file
    torch.manual_seed(1)
    model = S3DG(7, gating=True)
    fresh = {k: v.clone() for k, v in model.state_dict().items() if ".fc." in k or k.startswith("classifier")}
    load_weights(model, path, "inception_v1_2d")
    after = model.state_dict()
    assert len(fresh) == 2 * 37 + 2
    assert all(torch.equal(after[k], v) for k, v in fresh.items())
    assert sum(isinstance(m, SelfGating) for m in model.modules()) == 37


def test_inception_checkpoint_that_does_not_fit_names_file_and_every_problem(googlenet_file, tmp_path):
    net2d, _ = googlenet_file
    state = net2d.state_dict()
    del state["inception4c.branch2.1.conv.weight"]
    state["inception6a.branch1.conv.weight"] = torch.zeros(1)
    state["conv3.conv.weight"] = torch.zeros(192, 64, 5, 5)
    path = tmp_path / "broken.pt"
    torch.save(state, path)
    with pytest.raises(WeightsError) as error:
        inflate_inception_v1(S3DG(400), path)
    message = str(error.value)
    assert message.startswith(f"{path}: does not fit Inception-v1 inflated to this S3D-G")
    assert "missing keys (1): inception4c.branch2.1.conv.weight" in message
    assert "unexpected keys (1): inception6a.branch1.conv.weight" in message
    assert "conv3.conv.weight (192, 64, 5, 5) vs (192, 64, 3, 3)" in message


def test_narrow_network_cannot_take_inception_weights(googlenet_file):
    _, path = googlenet_file
    with pytest.raises(WeightsError, match=r"shape mismatches \(file vs network\) \(\d+\): conv1.bn.bias \(64,\) vs \(16,\)"):
        inflate_inception_v1(S3DG(400, width=0.25), path)


def test_s3dg_state_dict_round_trips_exactly(tmp_path):
    torch.manual_seed(0)
    source = S3DG(6, in_channels=2, width=0.25)
    path = tmp_path / "model.pt"
    torch.save(source.state_dict(), path)
    target = S3DG(6, in_channels=2, width=0.25)
    load_weights(target, path, "s3dg")
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))


def test_s3dg_state_dict_of_another_network_is_refused_listing_keys_and_shapes(tmp_path):
    path = tmp_path / "other.pt"
    state = S3DG(10, in_channels=3, width=0.25, gating=False).state_dict()
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(WeightsError) as error:
        load_s3dg(S3DG(6, in_channels=2, width=0.25, gating=True), path)
    message = str(error.value)
    assert message.startswith(f"{path}: does not fit this S3D-G: missing keys (74): base.conv_2c.1.fc.bias")
    assert "unexpected keys (1): extra.weight" in message
    assert "classifier.weight (10, 256, 1, 1, 1) vs (6, 256, 1, 1, 1)" in message
    assert "base.conv_1a.0.0.weight (16, 3, 1, 7, 7) vs (16, 2, 1, 7, 7)" in message


def test_missing_file_and_non_state_dict_are_refused_naming_the_file(tmp_path):
    with pytest.raises(WeightsError, match=f"{tmp_path / 'none.pt'}: no such weights file"):
        load_s3dg(S3DG(3, width=0.25), tmp_path / "none.pt")
    path = tmp_path / "list.pt"
    torch.save([1, 2], path)
    with pytest.raises(WeightsError, match=f"{path}: expected a state dict"):
        load_s3dg(S3DG(3, width=0.25), path)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=f"{garbage}: not a PyTorch state dict"):
        load_weights(S3DG(3, width=0.25), garbage, "inception_v1_2d")


def test_head_reinit_loads_all_but_the_classifier_of_a_network_with_other_classes(tmp_path):
    path = tmp_path / "kinetics.pt"
    source = S3DG(400, in_channels=3, width=0.25).state_dict()
    torch.save(source, path)
    target = S3DG(101, in_channels=3, width=0.25)
    fresh = {k: v.clone() for k, v in target.state_dict().items() if k.startswith("classifier.")}

    report = load_weights(target, path, "s3dg", head="reinit")

    loaded = target.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in source.items() if not k.startswith("classifier."))
    assert all(torch.equal(loaded[k], v) for k, v in fresh.items())
    assert report.loaded == len(source) - 2 and report.reinitialised == ["classifier.bias", "classifier.weight"]
    assert report.skipped == ["classifier.bias (400,)", "classifier.weight (400, 256, 1, 1, 1)"]
    assert "freshly initialised (2): classifier.bias, classifier.weight" in report.summary()


def test_another_class_count_without_head_reinit_is_refused_saying_how_to_fine_tune(tmp_path):
    path = tmp_path / "kinetics.pt"
    torch.save(S3DG(400, in_channels=3, width=0.25).state_dict(), path)
    with pytest.raises(WeightsError, match="classifier.weight .400, 256, 1, 1, 1. vs .101, 256, 1, 1, 1..*"
                                           "init.head reinit loads the rest"):
        load_weights(S3DG(101, in_channels=3, width=0.25), path, "s3dg")


def test_head_reinit_still_refuses_a_mismatch_below_the_classifier(tmp_path):
    path = tmp_path / "rgb.pt"
    torch.save(S3DG(400, in_channels=3, width=0.25).state_dict(), path)
    with pytest.raises(WeightsError, match=r"does not fit this S3D-G's layers below the classifier: shape mismatches "
                                           r"\(file vs network\) \(1\): base.conv_1a.0.0.weight \(16, 3, 1, 7, 7\) vs "
                                           r"\(16, 2, 1, 7, 7\)$"):
        load_weights(S3DG(101, in_channels=2, width=0.25), path, "s3dg", head="reinit")


# torchvision's S3D, as its documentation and source describe it: a `features` Sequential of separable convs
# (a 1xkxk then a kx1x1 conv + BatchNorm unit), max-pools and Inception blocks given as (in, b0, b1 reduce, b1,
# b2 reduce, b2, b3), then `classifier` = Dropout + a 1x1x1 conv; 8,320,048 parameters with 400 classes.
TORCHVISION_S3D_FEATURES = [
    ("separable", 3, 64, 7), ("pool",), ("unit", 64, 64, 1), ("separable", 64, 192, 3), ("pool",),
    ("block", 192, 64, 96, 128, 16, 32, 32), ("block", 256, 128, 128, 192, 32, 96, 64), ("pool",),
    ("block", 480, 192, 96, 208, 16, 48, 64), ("block", 512, 160, 112, 224, 24, 64, 64),
    ("block", 512, 128, 128, 256, 24, 64, 64), ("block", 512, 112, 144, 288, 32, 64, 64),
    ("block", 528, 256, 160, 320, 32, 128, 128), ("pool",),
    ("block", 832, 256, 160, 320, 32, 128, 128), ("block", 832, 384, 192, 384, 48, 128, 128),
]


def torchvision_s3d_state(num_classes: int = 400) -> dict[str, torch.Tensor]:
    """A state dict in torchvision's S3D layout, random values, built from the layout above."""
    shapes: dict[str, tuple] = {}

    def unit(prefix: str, cin: int, cout: int, kernel: tuple) -> None:
        shapes[f"{prefix}.0.weight"] = (cout, cin, *kernel)
        shapes.update({f"{prefix}.1.{part}": (cout,) for part in ("weight", "bias", "running_mean", "running_var")})
        shapes[f"{prefix}.1.num_batches_tracked"] = ()

    def separable(prefix: str, cin: int, cout: int, k: int) -> None:
        unit(f"{prefix}.0", cin, cout, (1, k, k))
        unit(f"{prefix}.1", cout, cout, (k, 1, 1))

    for index, layer in enumerate(TORCHVISION_S3D_FEATURES):
        prefix = f"features.{index}"
        if layer[0] == "separable":
            separable(prefix, *layer[1:])
        elif layer[0] == "unit":
            unit(prefix, layer[1], layer[2], (1, 1, 1))
        elif layer[0] == "block":
            cin, b0, b1a, b1, b2a, b2, b3 = layer[1:]
            unit(f"{prefix}.branch0", cin, b0, (1, 1, 1))
            for branch, reduce, out in (("branch1", b1a, b1), ("branch2", b2a, b2)):
                unit(f"{prefix}.{branch}.0", cin, reduce, (1, 1, 1))
                separable(f"{prefix}.{branch}.1", reduce, out, 3)
            unit(f"{prefix}.branch3.1", cin, b3, (1, 1, 1))
    shapes["classifier.1.weight"] = (num_classes, 1024, 1, 1, 1)
    shapes["classifier.1.bias"] = (num_classes,)
    generator = torch.Generator().manual_seed(0)
    return {k: torch.randint(0, 100, shape) if k.endswith("num_batches_tracked") else torch.randn(shape, generator=generator)
            for k, shape in shapes.items()}


def test_the_torchvision_s3d_layout_of_the_test_has_the_documented_parameter_count():
    state = torchvision_s3d_state()
    assert sum(v.numel() for k, v in state.items() if not k.endswith(("running_mean", "running_var",
                                                                           "num_batches_tracked"))) == 8_320_048


def test_torchvision_s3d_weights_load_into_the_gating_free_network_tensor_for_tensor(tmp_path):
    path = tmp_path / "s3d.pt"
    state = torchvision_s3d_state()
    torch.save(state, path)
    model = S3DG(400, in_channels=3, width=1.0, gating=False)

    report = load_weights(model, path, "torchvision_s3d")

    loaded = model.state_dict()
    assert report.loaded == len(state) == len(loaded) and not report.reinitialised and not report.skipped
    pairs = {"features.0.0.0.weight": "base.conv_1a.0.0.weight", "features.0.1.1.running_var": "base.conv_1a.1.1.running_var",
             "features.2.0.weight": "base.conv_2b.0.weight", "features.3.1.0.weight": "base.conv_2c.0.1.0.weight",
             "features.5.branch0.0.weight": "base.mixed_3b.branch0.0.0.weight",
             "features.9.branch1.1.0.0.weight": "base.mixed_4c.branch1.1.0.0.weight",
             "features.12.branch2.1.1.1.bias": "base.mixed_4f.branch2.1.1.1.bias",
             "features.15.branch3.1.1.running_mean": "base.mixed_5c.branch3.1.1.running_mean",
             "classifier.1.weight": "classifier.weight", "classifier.1.bias": "classifier.bias"}
    for theirs, ours in pairs.items():
        assert torch.equal(loaded[ours], state[theirs]), ours


def test_torchvision_s3d_starts_a_gated_flow_teacher_on_other_classes(tmp_path):
    path = tmp_path / "s3d.pt"
    state = torchvision_s3d_state()
    torch.save(state, path)
    model = S3DG(101, in_channels=2, width=1.0, gating=True)

    report = load_weights(model, path, "torchvision_s3d", head="reinit")

    loaded = model.state_dict()
    expected_first = state["features.0.0.0.weight"].mean(dim=1, keepdim=True).repeat(1, 2, 1, 1, 1)
    assert torch.allclose(loaded["base.conv_1a.0.0.weight"], expected_first)
    assert torch.equal(loaded["base.mixed_5c.branch0.0.0.weight"], state["features.15.branch0.0.weight"])
    gates = [k for k in loaded if ".fc." in k]
    assert sorted(report.reinitialised) == sorted(gates + ["classifier.bias", "classifier.weight"])
    assert report.skipped == ["classifier.1.bias (400,)", "classifier.1.weight (400, 1024, 1, 1, 1)"]


def test_a_torchvision_s3d_file_for_another_width_is_refused_listing_the_mismatches(tmp_path):
    path = tmp_path / "s3d.pt"
    torch.save(torchvision_s3d_state(), path)
    with pytest.raises(WeightsError, match=r"does not fit torchvision's S3D as this S3D-G \(it needs model.width "
                                           r"1.0\): shape mismatches \(file vs network\) \(386\): classifier.1.weight "
                                           r"\(400, 1024, 1, 1, 1\) vs \(400, 512, 1, 1, 1\), features.0.0.0.weight"):
        load_weights(S3DG(400, width=0.5, gating=False), path, "torchvision_s3d")
