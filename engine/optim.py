"""The optimizers the engine drives, behind one small interface, so the loop never asks which one it has.

    optimizer.begin_step(lr, micro_steps)   before the step's first forward
    loss.backward()                          once per micro-step
    grad_norm = optimizer.end_step()         the step's global gradient norm (unclipped), a device tensor
    optimizer.apply(finite)                  update (or drop the update of a non-finite step)

AdamW after backward (torch's, fused on CUDA) or, in memory mode, the 8-bit AdamW that updates each
parameter inside backward (engine/memory_mode/), whose apply() has nothing left to do.
"""

from typing import Protocol

import torch

from engine.config import Config


class StepOptimizer(Protocol):
    def begin_step(self, lr: float, micro_steps: int) -> None: ...

    def end_step(self) -> torch.Tensor: ...

    def apply(self, finite: bool = True) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class AfterBackward:
    """A torch.optim optimizer stepping after backward, its gradients first clipped to grad_clip by their
    global norm (0: not clipped, the norm still measured)."""

    def __init__(self, optimizer: torch.optim.Optimizer, grad_clip: float):
        self.optimizer, self.grad_clip = optimizer, grad_clip
        self.params = [p for group in optimizer.param_groups for p in group["params"]]

    def begin_step(self, lr: float, micro_steps: int) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def end_step(self) -> torch.Tensor:
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip if self.grad_clip > 0 else float("inf"))
        # Sharded (FSDP) gradients are DTensors: their norm is the global one, a replicated DTensor
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def apply(self, finite: bool = True) -> None:
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer parameter groups: weight decay on matrices, none on norms' vectors."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def prepare_parameters(model: torch.nn.Module, cfg: Config) -> None:
    """Before the model moves to the device: memory mode keeps bf16 weights only, converted here so the GPU
    never holds the fp32 ones."""
    if cfg.memory_mode:
        from engine.memory_mode.optimizer import prepare_model_for_memory_mode

        prepare_model_for_memory_mode(model)


def build_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device) -> StepOptimizer:
    """AdamW with weight decay on matrices only, fused on CUDA; in memory mode the in-backward 8-bit AdamW."""
    if cfg.memory_mode:
        from engine.memory_mode.optimizer import InBackwardOptimizer

        return InBackwardOptimizer(model, (cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                                   grad_clip=cfg.grad_clip, seed=cfg.seed)
    fused = cfg.use_fused_optimizer and device.type == "cuda"
    adamw = torch.optim.AdamW(decay_groups(model, cfg.weight_decay), lr=cfg.learning_rate,
                              betas=(cfg.beta1, cfg.beta2), fused=fused)
    return AfterBackward(adamw, cfg.grad_clip)
