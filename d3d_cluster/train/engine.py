"""The DeepSpeed engine of a stage: its config, optimizer and learning-rate schedule, from the spec."""

from __future__ import annotations

import math

import torch
from torch import nn

from d3d_cluster.spec import DeepSpeedSpec, OptimizerSpec


def deepspeed_config(ds: DeepSpeedSpec, micro_batch: int, accumulation: int, bf16: bool) -> dict:
    """The global batch stays `ds.global_batch_size` whatever the world size: accumulation absorbs it."""
    return {
        "train_batch_size": ds.global_batch_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": ds.gradient_clipping,
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": bf16},
        "data_types": {"grad_accum_dtype": "fp32"},
        "steps_per_print": 2**31 - 1,
    }


def build_optimizer(settings: OptimizerSpec, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if settings.name == "adamw":
        return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay,
                           nesterov=True)


def build_schedule(settings: OptimizerSpec, optimizer: torch.optim.Optimizer, total_steps: int,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then cosine decay to zero (or constant); stepped once per optimizer step."""
    warmup = min(int(settings.warmup_epochs * steps_per_epoch), total_steps - 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if settings.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def initialize(model: nn.Module, settings: OptimizerSpec, ds: DeepSpeedSpec, micro_batch: int, accumulation: int,
               optimizer_steps: int, steps_per_epoch: int, bf16: bool):
    import deepspeed

    optimizer = build_optimizer(settings, model)
    schedule = build_schedule(settings, optimizer, optimizer_steps, steps_per_epoch)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=schedule,
        config=deepspeed_config(ds, micro_batch, accumulation, bf16),
    )
    return engine


def step_with_grad_norm(engine) -> float | None:
    """`engine.step()`, returning the global gradient norm (before clipping) when the step updated the weights.

    DeepSpeed keeps that norm for ZeRO-1/2 and bf16; plain fp32 ZeRO-0 reports None, so it is taken from the
    gradients, which are already averaged over ranks at the accumulation boundary.
    """
    if not engine.is_gradient_accumulation_boundary():
        engine.step()
        return None
    own = None
    if not engine.zero_optimization() and not engine.bfloat16_enabled():
        grads = [p.grad.detach().float() for p in engine.module.parameters() if p.grad is not None]
        own = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
    engine.step()
    norm = engine.get_global_grad_norm()
    return own if norm is None else float(norm)
