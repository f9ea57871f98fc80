"""The motion probe of D3D (Stroud et al. 2020, section 3): how much optical flow can be read off a network's
frozen features, layer by layer. This is how a user checks whether distillation put motion into the RGB stream.

For each probed layer a small decoder (BatchNorm, a 1x3x3 conv, ReLU, a 1x1x1 conv to 2 channels) is trained
on the frozen layer's output to predict the clip's optical flow, resized to that layer's resolution by
averaging (the flow of the very clip the network sees, from the shards). The trained network runs in eval
mode without gradients; all decoders train together on the same batches. Each layer is scored on the validation
split by its end-point error (EPE: the mean Euclidean distance between predicted and true flow vectors), in
pixels of the stored frames, next to the EPE of predicting zero flow at the same resolution (the mean flow
magnitude there): a decoder that does not beat zero flow found no motion in that layer.

Motion is sparse (a moving object on a still background), which makes zero flow a strong answer under the EPE.
Three choices let a decoder beat it where the features carry motion (measured in BENCHMARKS.md, "Motion
probe"): each decoder starts at zero flow (its output layer is zero), predicts flow in units of its layer's RMS
flow, and trains on the EPE itself (smoothed at zero). A decoder trained on the squared error learns the
conditional mean, a shrunken vector smeared over still cells, which scored worse than zero flow at the upper
layers of the flow teacher itself.

The frozen network runs once on each of `probe.views` augmented epochs of the train split, its features are
kept (float16), and the decoders cycle over them for `probe.epochs` epochs: at the upper layers, whose decoders
are small, running the network was most of the probe's time, and kept features decoded as well as 48 fresh views
(BENCHMARKS.md, "Motion probe").
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from d3d_cluster.data.pipeline import Batch, ClipLoader
from d3d_cluster.data.schema import Manifest
from d3d_cluster.files import write_json_atomically
from d3d_cluster.rundir import RunDir
from d3d_cluster.models import S3DG
from d3d_cluster.models.weights import load_s3dg
from d3d_cluster.spec import ProbeSpec
from d3d_cluster.train.engine import autocast, prepare_device
from d3d_cluster.train.stages import EXPORT_NAME, STAGE_INPUT, build_model

PROBE_NAME = "probe.json"


@dataclass(frozen=True)
class ProbeRow:
    layer: str
    resolution: tuple[int, int, int]  # (T, H, W) at which flow is predicted
    epe: float  # pixels
    zero_flow_epe: float  # pixels: the EPE of predicting no motion


def end_point_error(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over positions of |predicted - target| for (N, 2, T, H, W) flow fields."""
    return torch.linalg.vector_norm(predicted - target, dim=1).mean()


def smooth_end_point_error(predicted: torch.Tensor, target: torch.Tensor, eps: float = 1e-2) -> torch.Tensor:
    """The EPE with a gradient at zero error (the norm has none there, where every zero-initialised decoder starts
    on still cells)."""
    return ((predicted - target).square().sum(1) + eps * eps).sqrt().mean()


def flow_decoder(channels: int, hidden: int) -> nn.Module:
    """BatchNorm first: frozen features differ in scale by orders of magnitude between layers and networks. The
    output layer starts at zero, so every decoder starts from the zero-flow prediction and moves off it only as
    far as the features carry motion."""
    output = nn.Conv3d(hidden, 2, 1)
    nn.init.zeros_(output.weight)
    nn.init.zeros_(output.bias)
    return nn.Sequential(nn.BatchNorm3d(channels), nn.Conv3d(channels, hidden, (1, 3, 3), padding=(0, 1, 1)),
                         nn.ReLU(inplace=True), output)


class MotionProbe:
    """Decoders on the named layers of one frozen network."""

    def __init__(self, network: S3DG, modality: str, layers: list[str], flow_bound: float, hidden: int,
                 device: torch.device):
        self.network = network.to(device).eval().requires_grad_(False)
        self.modality, self.layers, self.flow_bound, self.hidden = modality, list(layers), flow_bound, hidden
        self.device = device
        self.decoders: nn.ModuleDict | None = None  # built on the first batch, when channels are known
        # Each layer's decoder predicts flow divided by the RMS flow magnitude at its resolution (measured on the
        # first batch): averaged over a coarse cell, flow shrinks to a fraction of a pixel, and a decoder trained
        # on raw pixels would take optimizer steps larger than its targets.
        self.scales: dict[str, float] = {}

    def _features_and_targets(self, batch: Batch) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        with torch.no_grad(), autocast(self.device):
            features = self.network.endpoints(getattr(batch, self.modality).to(self.device), self.layers)
        flow = batch.flow.to(self.device).float() * self.flow_bound  # [-1, 1] back to pixels
        features = {name: f.float() for name, f in features.items()}
        targets = {name: F.adaptive_avg_pool3d(flow, f.shape[2:]) for name, f in features.items()}
        if self.decoders is None:
            self.decoders = nn.ModuleDict({name: flow_decoder(f.shape[1], self.hidden)
                                           for name, f in features.items()}).to(self.device)
            self.scales = {name: max(1e-3, target.square().sum(1).mean().sqrt().item())
                           for name, target in targets.items()}
        return features, targets

    def predict(self, name: str, features: torch.Tensor) -> torch.Tensor:
        """Flow in pixels from one layer's features."""
        return self.decoders[name](features) * self.scales[name]

    def _kept_views(self, loader: ClipLoader, views: int) -> list[list[tuple[dict, dict]]]:
        """The features and targets of `views` augmented epochs of the split, as float16, refused before they
        outgrow the memory the device has free."""
        kept = []
        for view in range(views):
            batches = []
            for batch in loader.epoch(view):
                features, targets = self._features_and_targets(batch)
                batches.append(({name: f.half() for name, f in features.items()}, targets))
                if not kept and len(batches) == 1:
                    self._check_room(batches[0], loader.steps_per_epoch * views)
            kept.append(batches)
        return kept

    def _check_room(self, batch: tuple[dict, dict], batches: int) -> None:
        needed = batches * sum(t.numel() * t.element_size() for part in batch for t in part.values())
        if self.device.type == "cuda":
            free = torch.cuda.mem_get_info(self.device)[0]
        else:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        if needed > free / 2:
            raise MemoryError(f"probe.views keeps {needed / 2**30:.1f} GiB of features of {', '.join(self.layers)} "
                              f"({batches} batches), and {self.device} has {free / 2**30:.1f} GiB free: lower "
                              "probe.views, probe fewer layers, or set probe.views: null to compute the features "
                              "afresh every epoch")

    def train(self, loader: ClipLoader, epochs: int, lr: float, views: int | None = None) -> list[float]:
        """Train every decoder (Adam, cosine decay to zero); returns the mean training EPE of the scaled flow
        (summed over layers) of each epoch. With `views`, epoch e trains on view e mod `views`, whose features
        were computed once; without, every epoch runs the network on a fresh view."""
        kept = self._kept_views(loader, views) if views else None
        history, optimizer, schedule = [], None, None
        for epoch in range(epochs):
            total, count = 0.0, 0
            batches = kept[epoch % views] if kept else map(self._features_and_targets, loader.epoch(epoch))
            for features, targets in batches:
                if optimizer is None:
                    optimizer = torch.optim.Adam(self.decoders.parameters(), lr=lr)
                    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, epochs * loader.steps_per_epoch))
                self.decoders.train()
                loss = sum(smooth_end_point_error(self.decoders[name](f.float()), targets[name] / self.scales[name])
                           for name, f in features.items())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total, count = total + loss.item(), count + 1
            history.append(total / max(1, count))
        return history

    @torch.no_grad()
    def evaluate(self, loader: ClipLoader) -> list[ProbeRow]:
        self.decoders.eval()
        sums = {name: [0.0, 0.0] for name in self.layers}
        clips, resolution = 0, {}
        for batch in loader.epoch(loader.first_epoch):
            features, targets = self._features_and_targets(batch)
            n = len(batch.labels)
            for name, f in features.items():
                sums[name][0] += end_point_error(self.predict(name, f), targets[name]).item() * n
                sums[name][1] += torch.linalg.vector_norm(targets[name], dim=1).mean().item() * n
                resolution[name] = tuple(f.shape[2:])
            clips += n
        return [ProbeRow(name, resolution[name], sums[name][0] / clips, sums[name][1] / clips) for name in self.layers]


def run_probe(run_dir: str | Path, stage: str, settings: ProbeSpec | None = None,
              device: torch.device | None = None) -> dict:
    """Probe the exported network of `stage` in a run directory; writes and returns `<stage>/probe.json`."""
    started = time.time()
    run = RunDir(run_dir)
    spec = run.spec()
    settings = settings or spec.probe
    if stage not in STAGE_INPUT:
        raise ValueError(f"unknown stage {stage!r} (expected one of {', '.join(STAGE_INPUT)})")
    weights = run.path / stage / EXPORT_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: no exported network; train the {stage} stage first")
    device = device or (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    prepare_device(device, spec.model.precision)  # the features in the precision the network was trained in
    shards = spec.path(spec.data.shards)
    manifest = Manifest.load(shards)
    modality = STAGE_INPUT[stage]
    network = build_model(spec.model, modality, len(manifest.classes))
    load_s3dg(network, weights)
    torch.manual_seed(spec.seed)

    modalities = tuple(dict.fromkeys((modality, "flow")))
    clip = dict(modalities=modalities, rank=0, world=1, seed=spec.seed,
                device_id=device.index if device.type == "cuda" else None)
    probe = MotionProbe(network, modality, settings.layers, manifest.flow_bound, settings.hidden, device)
    train = ClipLoader(shards, "train", spec.data, train=True, whole_epochs=True, epochs=settings.views or settings.epochs,
                       **clip)
    history = probe.train(train, settings.epochs, settings.lr, settings.views)
    train.close()
    val = ClipLoader(shards, "val", spec.data, train=False, **clip)
    rows = probe.evaluate(val)
    val_samples = len(val.table)
    val.close()
    result = {"run": run.path.name, "stage": stage, "input": modality, "val_samples": val_samples,
              "flow_units": "pixels", "target_scales": probe.scales, "train_epe_per_epoch": history,
              "layers": [asdict(row) for row in rows],
              "settings": settings.model_dump(), "seconds": time.time() - started}
    write_json_atomically(run.path / stage / PROBE_NAME, result)
    return result
