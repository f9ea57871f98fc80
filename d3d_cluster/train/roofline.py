"""How fast a card could run an S3D-G training step, from what the step computes and what it moves
(`d3dc model-info --roofline`).

Every aten operation of one real step (the stage's own forward, loss and backward, as `benchmarks.model_step` times
it) is recorded on the meta device in bf16, as autocast runs it on a GPU: nothing is allocated or computed, so the
Kinetics geometry is counted in seconds. For each operation:

- FLOPs: torch's FLOP formulas (`torch.utils.flop_counter`), which count convolutions and matrix products, 2 per
  multiply-add, forward and both backward products; elementwise work is left out, as the S3D-G paper leaves it out.
- bytes, unfused: every tensor the operation reads plus every tensor it writes, as if each operation were a kernel
  of its own that meets its data in memory (views move nothing; an in-place operation reads and writes its tensor).
- bytes, fused: the same without BatchNorm and ReLU, forward and backward, as if the convolution whose output they
  read did their work on the way out (every BatchNorm of S3D-G follows a convolution, every ReLU a BatchNorm).

The weights' own traffic is added once a step, shared by its clips: autocast casts each fp32 weight to bf16 and the
bf16 gradient back to fp32 (6 bytes a parameter each), and AdamW reads weight, gradient and two moments and writes
three (28 bytes). A step takes at least its bytes over the card's bandwidth and at least its FLOPs over its bf16
rate; `per_operation` is tighter: each operation at its own roof, one after the other.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.autograd.graph import register_multi_grad_hook
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from d3d_cluster.data.pipeline import Batch
from d3d_cluster.models.s3dg import S3DG
from d3d_cluster.spec import DistillSpec, Spec
from d3d_cluster.train.stages import INPUT_CHANNELS, STAGE_INPUT, Stage

# Vendors' data sheets, SXM parts: memory bandwidth (bytes/s) and dense bf16 tensor-core rate (FLOP/s).
CARDS = {
    "h100": {"name": "H100 SXM 80 GB", "bandwidth": 3.35e12, "bf16_flops": 989e12},
    "h200": {"name": "H200 SXM 141 GB", "bandwidth": 4.8e12, "bf16_flops": 989e12},
    "a100": {"name": "A100 SXM 80 GB", "bandwidth": 2.039e12, "bf16_flops": 312e12},
}
FOLDED_INTO_CONVOLUTION = {"native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_functional",
                           "native_batch_norm_backward", "relu", "relu_", "threshold_backward"}
MOVES_NOTHING = {"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like", "detach", "lift_fresh"}
WEIGHT_BYTES_A_STEP = 6 + 6 + 28  # a parameter's bytes: cast to bf16, gradient back to fp32, AdamW
INPUT, HEAD, PROJECTION, LOSS, TEACHER, WEIGHTS = ("input layout", "head", "distillation projection", "loss",
                                                   "frozen teacher (forward)", "weights (casts, AdamW)")


@dataclass(frozen=True)
class Operation:
    flops: int
    bytes_unfused: int
    bytes_fused: int
    backward: bool


@dataclass(frozen=True)
class Part:
    """A layer (or the loss, the frozen teacher, the weights' updates) of one training step, per clip."""

    name: str
    forward_flops: float
    backward_flops: float
    bytes_unfused: float
    bytes_fused: float

    @property
    def flops(self) -> float:
        return self.forward_flops + self.backward_flops

    @property
    def intensity(self) -> float:
        """FLOPs a byte moved, unfused: above the card's ridge (its FLOP rate over its bandwidth) compute decides."""
        return self.flops / self.bytes_unfused if self.bytes_unfused else 0.0


@dataclass(frozen=True)
class StepRoofline:
    stage: str
    batch: int
    parts: tuple[Part, ...]
    operations: tuple[Operation, ...]  # the whole step's, for the whole batch, weights' traffic last

    def total(self, key: str) -> float:
        return sum(getattr(part, key) for part in self.parts)

    def limits(self, card: dict) -> dict[str, float]:
        """Clips/s the card allows: by bandwidth (unfused, fused), by bf16 rate, and each operation at its roof."""
        bandwidth, rate = card["bandwidth"], card["bf16_flops"]

        def per_operation(key: str) -> float:
            seconds = sum(max(getattr(op, key) / bandwidth, op.flops / rate) for op in self.operations)
            return self.batch / seconds

        return {"memory_unfused": bandwidth / self.total("bytes_unfused"),
                "memory_fused": bandwidth / self.total("bytes_fused"),
                "compute": rate / self.total("flops"),
                "per_operation_unfused": per_operation("bytes_unfused"),
                "per_operation_fused": per_operation("bytes_fused")}

    def to_dict(self, card: dict) -> dict:
        return {"stage": self.stage, "batch": self.batch, "card": card,
                "per_clip": {key: self.total(key) for key in ("forward_flops", "backward_flops", "flops",
                                                              "bytes_unfused", "bytes_fused")},
                "clips_per_s": self.limits(card),
                "parts": [{**asdict(part), "flops": part.flops, "intensity": part.intensity} for part in self.parts]}


class _Recorder(TorchDispatchMode):
    """Every operation of the step, charged to the part `part_of()` names when it runs."""

    def __init__(self, part_of):
        super().__init__()
        self.part_of = part_of
        self.operations: dict[str, list[Operation]] = defaultdict(list)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if func.is_view or name in MOVES_NOTHING:
            return out
        formula = flop_registry.get(func.overloadpacket)
        flops = formula(*args, **kwargs, out_val=out) if formula else 0
        moved = sum(t.numel() * t.element_size() for t in [*tree_flatten((args, kwargs))[0], *tree_flatten(out)[0]]
                    if isinstance(t, torch.Tensor))
        backward = torch._C._current_graph_task_id() != -1
        self.operations[self.part_of()].append(
            Operation(flops, moved, 0 if name in FOLDED_INTO_CONVOLUTION else moved, backward))
        return out


class _Parts:
    """Which part of the step runs now: a tracked module's hooks push its part when its forward starts and pop it
    when it ends, and in the backward pass push it when the gradient of its output is ready and pop it when that of
    its input is (torch's ModuleTracker lost its place at the head, whose dropout returns its input)."""

    def __init__(self, parts: dict[torch.nn.Module, str]):
        self.parts, self.active, self.hooks = parts, [], []

    def current(self) -> str:
        return self.active[-1] if self.active else LOSS

    def _leave(self, part: str) -> None:
        if part in self.active:
            del self.active[len(self.active) - 1 - self.active[::-1].index(part)]

    def _when_gradients(self, tensors, action) -> None:
        needing = [t for t in tree_flatten(tensors)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
        if needing:
            self.hooks.append(register_multi_grad_hook(needing, lambda grads: action()))

    def __enter__(self) -> "_Parts":
        for module, part in self.parts.items():
            def before(module, inputs, part=part) -> None:
                self.active.append(part)
                self._when_gradients(inputs, lambda: self._leave(part))

            def after(module, inputs, output, part=part) -> None:
                self._leave(part)
                self._when_gradients(output, lambda: self.active.append(part))

            self.hooks += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
        return self

    def __exit__(self, *exception) -> None:
        for hook in self.hooks:
            hook.remove()


def step_roofline(stage: Stage, network: S3DG, batch_size: int, frames: int, size: int) -> StepRoofline:
    """The training step of `stage` (its frozen teacher, if it has one, on the meta device) for `network` built on
    the meta device, on a batch of `batch_size` clips of frames x size x size, in bf16."""
    meta = dict(device="meta", dtype=torch.bfloat16)
    batch = Batch(rgb=torch.empty(batch_size, 3, frames, size, size, **meta),
                  flow=torch.empty(batch_size, 2, frames, size, size, **meta),
                  labels=torch.zeros(batch_size, dtype=torch.long, device="meta"),
                  samples=torch.arange(batch_size), views=torch.zeros(batch_size, dtype=torch.long),
                  epochs=torch.zeros(batch_size, dtype=torch.long))
    with torch.device("meta"):
        trainable = stage.trainable(network).to(torch.bfloat16).train()
    tracked = {trainable: INPUT, network: INPUT, network.pool: HEAD, network.classifier: HEAD,
               **{layer: name for name, layer in network.base.named_children()}}
    if getattr(trainable, "projection", None) is not None:
        tracked[trainable.projection] = PROJECTION
    if stage.teacher is not None:  # every module of it: the distillation may run only its first layers
        tracked |= {module: TEACHER for module in stage.teacher.modules()}
    with _Parts(tracked) as parts, _Recorder(parts.current) as recorder:
        stage.loss(trainable(stage.inputs(batch)), batch).total.backward()

    parameters = sum(p.numel() for p in trainable.parameters())
    weights = Operation(0, WEIGHT_BYTES_A_STEP * parameters, WEIGHT_BYTES_A_STEP * parameters, True)
    order = [INPUT, *network.base._modules, HEAD, PROJECTION, LOSS, TEACHER]
    recorded = {name: recorder.operations[name] for name in order if name in recorder.operations}
    parts = [Part(name, sum(op.flops for op in ops if not op.backward) / batch_size,
                  sum(op.flops for op in ops if op.backward) / batch_size,
                  sum(op.bytes_unfused for op in ops) / batch_size, sum(op.bytes_fused for op in ops) / batch_size)
             for name, ops in recorded.items()]
    parts.append(Part(WEIGHTS, 0.0, 0.0, weights.bytes_unfused / batch_size, weights.bytes_fused / batch_size))
    operations = tuple(op for ops in recorded.values() for op in ops) + (weights,)
    return StepRoofline(stage.name, batch_size, tuple(parts), operations)


def training_step(stage: str, num_classes: int, frames: int, size: int, width: float = 1.0, gating: bool = True,
                  batch_size: int = 8, distill: DistillSpec | None = None) -> StepRoofline:
    """The roofline of a stage's step at this geometry; the student runs its frozen teacher live, with `distill`
    (default: the paper's loss, on the teacher's logits, which runs the whole teacher)."""
    modality = STAGE_INPUT[stage]
    with torch.device("meta"):
        network = S3DG(num_classes, INPUT_CHANNELS[modality], width, gating)
        teacher = None if stage != "student" else S3DG(num_classes, INPUT_CHANNELS["flow"], width, gating).to(
            torch.bfloat16).eval().requires_grad_(False)
    distill = (distill or DistillSpec(weight=1.0, target="logits")) if teacher is not None else None
    return step_roofline(Stage(stage, modality, Spec().student, distill, teacher), network, batch_size, frames, size)
