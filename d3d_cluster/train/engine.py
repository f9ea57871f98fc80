"""The DeepSpeed engine of a stage (its config, optimizer and learning-rate schedule, from the spec), and the
precision and layout every network runs in.

Precision: bf16 on the GPU comes from `torch.autocast`, not from DeepSpeed's ``bf16`` mode. DeepSpeed's mode
casts the module itself to bf16 and keeps fp32 master weights in the optimizer: BatchNorm's running statistics
would then be stored and updated in bf16 (8 bits of mantissa), and the frozen teacher, which runs outside the
engine, would not be covered. Under autocast the weights, BatchNorm statistics, gradients, all-reduces and
optimizer stay fp32 while the convolutions run in bf16 on tensor cores. The 8M-parameter S3D-G makes fp32
weights and gradient all-reduces cheap next to its convolutions. The CPU runs fp32, and so does a GPU with
`model.precision: fp32`. Precision is set for the whole process (`prepare_device`), as torch's TF32 switch it
includes is.

Two autocast contexts are needed, for one reason: on CUDA, DeepSpeed's forward *turns off* an autocast opened outside
it unless its own ``torch_autocast`` section is enabled (`deepspeed/runtime/torch_autocast.py`). So the engine
is configured with ``torch_autocast`` (bf16; ``lower_precision_safe_modules: []`` keeps gradient all-reduces
in fp32), and the loop opens `autocast` around the whole forward, which covers the teacher.

Layout: activations are channels-last (NDHWC) on every device (`S3DG` converts its input), which makes both
oneDNN and cuDNN choose their NDHWC convolution kernels. The weights stay in the default layout: DeepSpeed
broadcasts parameters at start through a byte view that needs them contiguous (a channels-last weight failed
here with "self.stride(-1) must be 1 to view Float as Byte"), and ZeRO flattens them into contiguous buffers.
"""

from __future__ import annotations

import contextlib
import datetime
import math

import torch
from torch import nn

from d3d_cluster.spec import DeepSpeedSpec, OptimizerSpec


_precision = "auto"  # this process's `model.precision`, set by `prepare_device`


def prepare_device(device: torch.device, precision: str) -> None:
    """Make `device` this process's GPU, and let cuDNN time its 3D convolution algorithms once per input shape and
    keep the fastest: a stage's clips all have one shape, so the timing pays from the second step. `precision`
    (`model.precision`) holds for the process: fp32 turns off autocast and cuDNN's TF32 convolutions."""
    global _precision
    _precision = precision
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = precision != "fp32"


def init_process_group(device: torch.device, timeout: datetime.timedelta) -> None:
    """DeepSpeed's process group: NCCL on a GPU, gloo on a CPU. On a CPU DeepSpeed would first build, with a C++
    compiler at run time, its shared-memory all-reduce for inference, which training never calls: minutes on a fresh
    machine, and a build killed midway leaves a lock file at which every later job on the machine waits forever."""
    import deepspeed
    import deepspeed.ops

    if device.type == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False, timeout=timeout)


def autocast_dtype(device: torch.device, precision: str | None = None) -> torch.dtype | None:
    """bf16 on a CUDA device unless the precision (default: the process's, from `prepare_device`) is fp32; None
    (fp32) elsewhere."""
    return torch.bfloat16 if device.type == "cuda" and (precision or _precision) == "auto" else None


def autocast(device: torch.device):
    """The forward-pass precision context of `device` (not for backward)."""
    dtype = autocast_dtype(device)
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def deepspeed_config(ds: DeepSpeedSpec, micro_batch: int, accumulation: int,
                     autocast_to: torch.dtype | None = None, load_universal: bool = False) -> dict:
    """The global batch stays `ds.global_batch_size` whatever the world size: accumulation absorbs it.

    No ``bf16``/``fp16`` section: weights, gradients and optimizer stay fp32; `autocast_to` enables DeepSpeed's
    ``torch_autocast`` for the forward (see the module docstring).
    """
    return {
        "train_batch_size": ds.global_batch_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": ds.gradient_clipping,
        "zero_optimization": {"stage": ds.zero_stage},
        # ZeRO refuses optimizers outside its short list, torch's SGD among them (the paper's, jobs/kinetics400.yaml);
        # ZeRO-1/2 only partition its state, whatever optimizer it is.
        "zero_allow_untested_optimizer": True,
        "data_types": {"grad_accum_dtype": "fp32"},
        "torch_autocast": {"enabled": autocast_to is not None, "dtype": str(autocast_to or torch.bfloat16),
                           "lower_precision_safe_modules": []},
        "steps_per_print": 2**31 - 1,
        "checkpoint": {"load_universal": load_universal},
    }


def build_optimizer(settings: OptimizerSpec, model: nn.Module) -> torch.optim.Optimizer:
    """On a GPU, AdamW runs fused (one kernel over all parameters): unfused, it took 8-15 ms of a 99-146 ms S3D-G step
    at 64x224x224 on an H100 (BENCHMARKS.md)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if settings.name == "adamw":
        return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay,
                                 fused=all(p.is_cuda for p in params))
    return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay,
                           nesterov=True)


def build_schedule(settings: OptimizerSpec, optimizer: torch.optim.Optimizer, total_steps: int,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then cosine decay to zero, step decay at given epochs, or constant; stepped once per
    optimizer step."""
    warmup = min(int(settings.warmup_epochs * steps_per_epoch), total_steps - 1)
    decay_steps = [int(epoch * steps_per_epoch) for epoch in settings.decay_epochs]

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if settings.schedule == "constant":
            return 1.0
        if settings.schedule == "step":
            return settings.decay_factor ** sum(step >= boundary for boundary in decay_steps)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def initialize(model: nn.Module, settings: OptimizerSpec, ds: DeepSpeedSpec, micro_batch: int, accumulation: int,
               optimizer_steps: int, steps_per_epoch: int, autocast_to: torch.dtype | None = None,
               compile: bool = False, load_universal: bool = False):
    """The engine over `model` (already on its device); `compile` wraps its forward in torch.compile;
    `load_universal` makes it load checkpoints converted to DeepSpeed's universal format."""
    import deepspeed

    optimizer = build_optimizer(settings, model)
    schedule = build_schedule(settings, optimizer, optimizer_steps, steps_per_epoch)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=schedule,
        config=deepspeed_config(ds, micro_batch, accumulation, autocast_to, load_universal),
    )
    if compile:
        engine.compile()
    return engine


def step_with_grad_norm(engine) -> torch.Tensor | None:
    """`engine.step()`, returning the global gradient norm (before clipping) when the step updated the weights, as a
    tensor on the device: reading it is left to the caller (`train.loop` reads it with the step's other figures).

    DeepSpeed keeps that norm for ZeRO-1/2 and bf16; plain fp32 ZeRO-0 reports None, so it is taken from the
    gradients, which are already averaged over ranks at the accumulation boundary.
    """
    if not engine.is_gradient_accumulation_boundary():
        engine.step()
        return None
    own = None
    if not engine.zero_optimization() and not engine.bfloat16_enabled():
        grads = [p.grad.detach().float() for p in engine.module.parameters() if p.grad is not None]
        own = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    engine.step()
    norm = engine.get_global_grad_norm()  # a tensor, or a float (inf when DeepSpeed found an overflow)
    if norm is None:
        return own
    return torch.as_tensor(norm, dtype=torch.float32, device=engine.device).detach().reshape(())
