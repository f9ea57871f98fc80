"""Initial weights for an S3D-G from a file the user names (nothing is ever downloaded).

Three formats:

``s3dg``
    A plain PyTorch state dict of this project's `S3DG` (what every stage exports as ``model.pt``), loaded
    strictly: a missing or unexpected key or a shape mismatch is refused with all of them listed. With the head
    policy ``reinit`` (fine-tuning on another label set, as D3D's UCF-101 and HMDB-51 results start from
    Kinetics-400 networks) the file's classifier is left out and the network's keeps its fresh initialisation;
    everything else is still loaded strictly.

``torchvision_s3d``
    The state dict of torchvision's S3D (``torchvision.models.video.s3d``: S3D without gating, 8,320,048
    parameters with 400 classes), which many PyTorch users already hold for Kinetics-400. Its layers are
    this network's at ``width=1.0`` under other names; each of its conv + BatchNorm units
    (``features.N...0.weight``, ``features.N...1.{weight,bias,running_mean,running_var}``) maps to one of this
    network's ``ConvBNReLU`` units, and ``classifier.1`` to ``classifier``:

    ==========================================  =========================================
    torchvision S3D                             this S3DG (``base.`` prefix)
    ==========================================  =========================================
    features.0.0, features.0.1                  conv_1a.0 (1x7x7), conv_1a.1 (7x1x1)
    features.2                                  conv_2b
    features.3.0, features.3.1                  conv_2c.0.0, conv_2c.0.1
    features.5, 6 / 8 .. 12 / 14, 15            mixed_3b, 3c / mixed_4b .. 4f / mixed_5b, 5c
    (block).branch0                             (block).branch0.0
    (block).branch1.0, .1.0, .1.1 (and branch2) (block).branch1.0, .1.0, .1.1
    (block).branch3.1 (after the pool)          (block).branch3.1
    ==========================================  =========================================

    With gating on, the gates have no counterpart and keep their fresh initialisation (listed as such);
    ``model.gating: false`` is torchvision's network exactly. A network that does not see RGB (the flow
    teacher) takes the first conv's RGB kernel averaged over its 3 input channels, as for ``inception_v1_2d``.
    torchvision's head averages 2x7x7 windows before its classifier, this network pools globally: the same
    at 16x224x224, close elsewhere. BatchNorm eps is 0.001 in both. ``init.head`` applies as for ``s3dg``.

``inception_v1_2d``
    An ImageNet Inception-v1 (GoogLeNet) 2D state dict in the common PyTorch naming: ``conv1``, ``conv2``,
    ``conv3``, ``inception3a`` .. ``inception5b`` with ``branch1`` .. ``branch4``, each conv a ``conv`` +
    ``bn`` pair (``<name>.conv.weight``, ``<name>.bn.{weight,bias,running_mean,running_var}``). Its ``fc``
    classifier and ``aux1``/``aux2`` heads are ignored. It is inflated to 3D as I3D did (Carreira and
    Zisserman 2017: repeat the 2D kernel over time and divide by the temporal size), adapted to S3D-G's
    separable convolutions:

    ========================  ==================================================
    2D (GoogLeNet)            3D (this S3DG, ``base.`` prefix)
    ========================  ==================================================
    conv1 (7x7 s2)            conv_1a.0 (1x7x7); conv_1a.1 (7x1x1) identity
    conv2 (1x1)               conv_2b
    conv3 (3x3)               conv_2c.0.0 (1x3x3); conv_2c.0.1 (3x1x1) identity
    inception3a, 3b           mixed_3b, mixed_3c
    inception4a .. 4e         mixed_4b .. mixed_4f
    inception5a, 5b           mixed_5b, mixed_5c
    branchN                   branch(N-1), for N = 1..4
    branch1 (1x1)             branch0.0
    branch2.0, branch3.0      branch1.0, branch2.0 (1x1 reduce)
    branch2.1, branch3.1      branch1.1.0, branch2.1.0 (1x3x3); .1.1 (3x1x1) identity
    branch4.1 (after pool)    branch3.1
    ========================  ==================================================

    - Every 2D kernel goes to a 1xkxk (or 1x1x1) conv: its temporal size is 1, so "repeat over time and
      divide by the temporal size" is the 2D kernel itself; its BatchNorm takes the 2D BatchNorm.
    - Each temporal kx1x1 conv of a separable pair has no 2D counterpart. It becomes the identity on its
      centre tap (zero on the others) and its BatchNorm the identity (gamma 1, beta 0, mean 0, variance
      1 - eps), so it passes its (post-ReLU, non-negative) input through unchanged. Then a clip that is
      constant over time gives, in every frame, exactly the 2D network's activations on that frame, at the
      temporal borders too. (Spreading the identity over the taps, identity/k each, would blur time at the
      start and match only away from the zero-padded borders.) Training then learns the temporal taps.
    - The first conv of a network that does not see RGB (the 2-channel flow teacher) takes the RGB kernel
      averaged over its 3 input channels, repeated for each input channel, as I3D did for its flow stream.
    - The gates, the classifier and anything else without a 2D counterpart keep their fresh initialisation.
    - Inception-v1's "5x5" branch is a 3x3 in both TF-slim's Inception-v1 and the common PyTorch GoogLeNet,
      as in S3D-G; the inflation needs ``width=1.0``. The pooling geometry follows TF-slim ("SAME"), which
      differs from torchvision's GoogLeNet (ceil-mode pools without padding) by a pixel at the borders:
      the weights transfer, border activations are not bit-identical to that implementation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from d3d_cluster.models.s3dg import INCEPTION_WIDTHS, S3DG

WeightsFormat = Literal["s3dg", "torchvision_s3d", "inception_v1_2d"]
HeadPolicy = Literal["load", "reinit"]
CLASSIFIER = "classifier."
_BN_PARTS = ("weight", "bias", "running_mean", "running_var")
_IGNORED_2D = ("fc.", "aux1.", "aux2.")
_INCEPTION_2D = ("inception3a", "inception3b", "inception4a", "inception4b", "inception4c", "inception4d",
                 "inception4e", "inception5a", "inception5b")


class WeightsError(ValueError):
    """A weights file that does not fit the network; the message names the file."""


@dataclass
class InitReport:
    """What initialising a network from a file did, for the log and the run's events."""

    path: str
    loaded: int  # tensors of the network set from the file
    reinitialised: list[str] = field(default_factory=list)  # the network's tensors left at their fresh initialisation
    skipped: list[str] = field(default_factory=list)  # the file's tensors not used, with their shapes

    def summary(self) -> str:
        parts = [f"{self.loaded} tensors loaded from {self.path}"]
        if self.reinitialised:
            parts.append(_listed("freshly initialised", self.reinitialised))
        if self.skipped:
            parts.append(_listed("skipped from the file", self.skipped))
        return "; ".join(parts)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises pickle, zip and runtime errors alike
        raise WeightsError(f"{path}: not a PyTorch state dict: {error}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(state).__name__}")
    return state


def _listed(title: str, items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
    return f"{title} ({len(items)}): {shown}"


def _check_fit(path: Path, state: dict[str, torch.Tensor], expected: dict[str, torch.Size], what: str,
               ignored: tuple[str, ...] = ()) -> None:
    """Refuse `state` unless it has exactly the `expected` keys and shapes (keys starting with `ignored` aside)."""
    present = {k for k in state if not k.startswith(ignored)}
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k])}" for k in sorted(present & set(expected))
                  if state[k].shape != expected[k]]
    if missing or unexpected or mismatched:
        problems = [_listed(title, items) for title, items in
                    (("missing keys", missing), ("unexpected keys", unexpected),
                     ("shape mismatches (file vs network)", mismatched)) if items]
        raise WeightsError(f"{path}: does not fit {what}: " + "; ".join(problems))


def load_s3dg(model: S3DG, path: str | os.PathLike, head: HeadPolicy = "load") -> InitReport:
    path = Path(path)
    state = read_state_dict(path)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if head == "load":
        try:
            _check_fit(path, state, expected, "this S3D-G")
        except WeightsError as error:
            if any(k in state and state[k].shape != shape for k, shape in expected.items() if k.startswith(CLASSIFIER)):
                raise WeightsError(f"{error}. The classifiers differ: init.head reinit loads the rest and starts "
                                   "the classifier fresh (fine-tuning on another set of classes)") from None
            raise
        model.load_state_dict(state)
        return InitReport(str(path), len(state))
    body = {k: shape for k, shape in expected.items() if not k.startswith(CLASSIFIER)}
    _check_fit(path, state, body, "this S3D-G's layers below the classifier", ignored=(CLASSIFIER,))
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith(CLASSIFIER)}, strict=False)
    return InitReport(str(path), len(body), reinitialised=sorted(set(expected) - set(body)),
                      skipped=[f"{k} {tuple(v.shape)}" for k, v in sorted(state.items()) if k.startswith(CLASSIFIER)])


_TORCHVISION_BLOCKS = {5: "mixed_3b", 6: "mixed_3c", 8: "mixed_4b", 9: "mixed_4c", 10: "mixed_4d", 11: "mixed_4e",
                       12: "mixed_4f", 14: "mixed_5b", 15: "mixed_5c"}
_CONV_BN_PARTS = ("0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked")


def _torchvision_units() -> list[tuple[str, str]]:
    """(torchvision S3D conv + BatchNorm prefix, this S3DG's ConvBNReLU prefix), in network order."""
    units = [("features.0.0", "base.conv_1a.0"), ("features.0.1", "base.conv_1a.1"), ("features.2", "base.conv_2b"),
             ("features.3.0", "base.conv_2c.0.0"), ("features.3.1", "base.conv_2c.0.1")]
    for index, name in _TORCHVISION_BLOCKS.items():
        block, ours = f"features.{index}", f"base.{name}"
        units.append((f"{block}.branch0", f"{ours}.branch0.0"))
        for branch in ("branch1", "branch2"):
            units += [(f"{block}.{branch}.{part}", f"{ours}.{branch}.{part}") for part in ("0", "1.0", "1.1")]
        units.append((f"{block}.branch3.1", f"{ours}.branch3.1"))
    return units


def load_torchvision_s3d(model: S3DG, path: str | os.PathLike, head: HeadPolicy = "load") -> InitReport:
    """Initialise `model` from torchvision's S3D state dict (see the module docstring for the mapping)."""
    path = Path(path)
    state = read_state_dict(path)
    target = model.state_dict()
    names = {f"{theirs}.{part}": f"{ours}.{part}" for theirs, ours in _torchvision_units() for part in _CONV_BN_PARTS}
    if head == "load":
        names.update({"classifier.1.weight": "classifier.weight", "classifier.1.bias": "classifier.bias"})
    in_channels = target["base.conv_1a.0.0.weight"].shape[1]
    expected = {theirs: target[ours].shape for theirs, ours in names.items()}
    first = "features.0.0.0.weight"
    expected[first] = torch.Size((expected[first][0], 3, *expected[first][2:]))
    ignored = ("classifier.",) if head == "reinit" else ()
    _check_fit(path, state, expected, "torchvision's S3D as this S3D-G (it needs model.width 1.0)", ignored)
    loaded = {ours: state[theirs] for theirs, ours in names.items()}
    if in_channels != 3:
        kernel = state[first].float()
        loaded[names[first]] = kernel.mean(dim=1, keepdim=True).repeat(1, in_channels, 1, 1, 1)
    model.load_state_dict(loaded, strict=False)
    return InitReport(str(path), len(loaded), reinitialised=sorted(set(target) - set(loaded)),
                      skipped=[f"{k} {tuple(v.shape)}" for k, v in sorted(state.items()) if k not in names])


def _inception_pairs() -> list[tuple[str, str, str | None]]:
    """(2D conv+bn prefix, 3D spatial ConvBNReLU prefix, 3D temporal ConvBNReLU prefix or None)."""
    pairs = [("conv1", "base.conv_1a.0", "base.conv_1a.1"), ("conv2", "base.conv_2b", None),
             ("conv3", "base.conv_2c.0.0", "base.conv_2c.0.1")]
    for name2d, name3d in zip(_INCEPTION_2D, INCEPTION_WIDTHS):
        block = f"base.{name3d}"
        pairs += [
            (f"{name2d}.branch1", f"{block}.branch0.0", None),
            (f"{name2d}.branch2.0", f"{block}.branch1.0", None),
            (f"{name2d}.branch2.1", f"{block}.branch1.1.0", f"{block}.branch1.1.1"),
            (f"{name2d}.branch3.0", f"{block}.branch2.0", None),
            (f"{name2d}.branch3.1", f"{block}.branch2.1.0", f"{block}.branch2.1.1"),
            (f"{name2d}.branch4.1", f"{block}.branch3.1", None),
        ]
    return pairs


def _identity_temporal(conv: torch.Tensor, bn_eps: float) -> dict[str, torch.Tensor]:
    """A kx1x1 conv + BatchNorm that passes non-negative input through: centre-tap identity, identity BN."""
    channels, _, taps, _, _ = conv.shape
    weight = torch.zeros_like(conv)
    weight[:, :, taps // 2, 0, 0] = torch.eye(channels, dtype=conv.dtype)
    return {"0.weight": weight, "1.weight": torch.ones(channels), "1.bias": torch.zeros(channels),
            "1.running_mean": torch.zeros(channels), "1.running_var": torch.full((channels,), 1.0 - bn_eps)}


def inflate_inception_v1(model: S3DG, path: str | os.PathLike) -> InitReport:
    """Initialise `model` from a 2D GoogLeNet state dict (see the module docstring for the mapping)."""
    path = Path(path)
    state = read_state_dict(path)
    target = model.state_dict()
    in_channels = target["base.conv_1a.0.0.weight"].shape[1]
    expected: dict[str, torch.Size] = {}
    for name2d, spatial, _ in _inception_pairs():
        conv = target[f"{spatial}.0.weight"]
        kernel = (conv.shape[0], 3 if name2d == "conv1" else conv.shape[1], *conv.shape[3:])
        expected[f"{name2d}.conv.weight"] = torch.Size(kernel)
        for part in _BN_PARTS:
            expected[f"{name2d}.bn.{part}"] = target[f"{spatial}.1.{part}"].shape
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    _check_fit(path, state, expected, "Inception-v1 inflated to this S3D-G (width must be 1.0)", _IGNORED_2D)

    inflated: dict[str, torch.Tensor] = {}
    bn_eps = next(m.eps for m in model.modules() if isinstance(m, torch.nn.BatchNorm3d))
    for name2d, spatial, temporal in _inception_pairs():
        kernel = state[f"{name2d}.conv.weight"].float()
        if name2d == "conv1" and in_channels != 3:
            kernel = kernel.mean(dim=1, keepdim=True).repeat(1, in_channels, 1, 1)
        inflated[f"{spatial}.0.weight"] = kernel[:, :, None]
        for part in _BN_PARTS:
            inflated[f"{spatial}.1.{part}"] = state[f"{name2d}.bn.{part}"].float()
        if temporal is not None:
            for key, value in _identity_temporal(target[f"{temporal}.0.weight"], bn_eps).items():
                inflated[f"{temporal}.{key}"] = value
    model.load_state_dict(inflated, strict=False)
    return InitReport(str(path), len(inflated), reinitialised=sorted(set(target) - set(inflated)),
                      skipped=[f"{k} {tuple(v.shape)}" for k, v in sorted(state.items()) if k.startswith(_IGNORED_2D)])


def load_weights(model: S3DG, path: str | os.PathLike, weights_format: WeightsFormat,
                 head: HeadPolicy = "load") -> InitReport:
    """Initialise `model` in place from `path` in the given format. The inflated 2D network never has the
    classifier (ImageNet's classes are not a video dataset's), whatever `head` says."""
    if weights_format == "s3dg":
        return load_s3dg(model, path, head)
    if weights_format == "torchvision_s3d":
        return load_torchvision_s3d(model, path, head)
    if weights_format == "inception_v1_2d":
        return inflate_inception_v1(model, path)
    raise ValueError(f"unknown weights format {weights_format!r} (expected s3dg, torchvision_s3d or inception_v1_2d)")
