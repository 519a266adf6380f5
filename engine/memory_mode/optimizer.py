"""AdamW inside backward, with 8-bit states: the optimizer of memory mode (see __init__.py for the bytes)."""

import importlib

import torch

from kernels.adamw_8bit_torch import BLOCK, BlockQuantized, FullPrecision, stochastic_round_to_bf16

CHUNK = 1 << 23  # elements per pass of an update: its half-dozen fp32 temporaries stay at 32 MB each


def prepare_model_for_memory_mode(model: torch.nn.Module) -> torch.nn.Module:
    """Parameters in bf16, with no fp32 master copy: InBackwardOptimizer computes each update in fp32 and
    rounds it stochastically into the bf16 weight. Buffers (RoPE tables) keep their dtype."""
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    return model


class _ParamState:
    def __init__(self, p: torch.Tensor, quantized: bool):
        n, device = p.numel(), p.device
        self.quantized = quantized
        self.step = torch.zeros((), device=device)  # per parameter: a skipped update does not count
        self.exp_avg = BlockQuantized(n, True, device) if quantized else FullPrecision(n, device)
        # sqrt(v) rather than v: half the dynamic range to cover in 8 bits, and it is what the update uses
        self.exp_avg_sqrt = BlockQuantized(n, False, device) if quantized else FullPrecision(n, device)
        # Last finite step's squared gradient norm; before the first step, as if all gradients were equal
        self.prev_grad_sq = torch.tensor(float(n), device=device)
        self.accumulator = None  # 8-bit sum of the earlier micro-steps' gradients, made on first use
        self.accumulating = False
        self.backwards_seen = 0  # this step's gradients so far: the last micro-step's one updates

    def tensors(self) -> dict:
        out = {"step": self.step, "prev_grad_sq": self.prev_grad_sq}
        for name in ("exp_avg", "exp_avg_sqrt"):
            out.update({f"{name}.{k}": v for k, v in getattr(self, name).tensors().items()})
        return out


def _chunks(numel: int):
    for start in range(0, numel, CHUNK):
        yield start, min(start + CHUNK, numel)


class InBackwardOptimizer:
    """AdamW (torch.optim.AdamW's update, decoupled weight decay on matrices only) applied to each parameter
    from a post-accumulate-grad hook, the moment backward completes its gradient; the gradient is then
    freed, so the model's gradients never all exist at once.

    Gradient accumulation over k micro-steps: the hook counts each parameter's gradients in the step; the
    first k-1 it only adds up, the k-th it steps. Adding up in .grad would keep every parameter's gradient alive
    between micro-steps (2 bytes per parameter in bf16: 2.9e9 bytes, more than the 8 GiB budget has left), so with 8-bit
    states the hook moves it into an 8-bit block-quantized accumulator (1 byte per parameter), rounded
    stochastically so the sum is unbiased; each micro-step adds noise of under one code step (1/16 to 1/8
    of the value), which should be small next to how much micro-batch gradients differ from one another.
    With 32-bit states .grad accumulates as usual, exactly.

    With torch.compile, compile each block rather than the whole model: a compiled backward hands out all
    the gradients of its graph at its end, which would bring back the memory this saves.

    Clipping: the global norm is only known when backward ends, after most updates. Each hook estimates it
    from the tensors seen so far in this step, assuming the others changed by the same factor since the
    last step: estimate^2 = (previous step's total) x (seen now / the same tensors last step). When all
    gradients scale together this is exactly torch's clip_grad_norm_, and the step with a spike is clipped,
    not (as with clipping by the previous step's norm) the normal step after it. A spike in one layer alone
    is clipped too, less exactly: the clipped norm was 0.46x grad_clip for a spike in the last layer (seen
    first, extrapolated to all) and 1.16x for one in the first layer (seen last) in tests/test_memory_mode.py.

    Non-finite gradients: a parameter whose gradient has a NaN/Inf keeps its weight and states bit for bit
    (torch.where, no host sync) and does not count the step. end_step returns the exact global norm of the
    step's (unclipped) gradients, non-finite when any was, for the engine's skip-and-count logic;
    `skipped` counts the parameters that kept their values. Nothing here syncs with the host.

    The engine drives it like any optimizer (engine/optim.py's StepOptimizer): begin_step, backward(s),
    end_step, apply; apply has nothing left to do.
    """

    def __init__(self, model: torch.nn.Module, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0,
                 grad_clip: float = 0.0, state_bits: int = 8, stochastic_rounding: bool = True, seed: int = 0,
                 use_triton: bool | None = None):
        """use_triton: the fused kernels (8-bit states only); None = on CUDA. The tests set it on CPU, where
        the kernels run in Triton's interpreter."""
        if state_bits not in (8, 32):
            raise ValueError(f"state_bits must be 8 or 32, got {state_bits}")
        self.betas, self.eps = betas, eps
        self.weight_decay, self.grad_clip, self.state_bits = weight_decay, grad_clip, state_bits
        self.stochastic_rounding = stochastic_rounding
        # Named as in the model's state_dict, whether or not the engine has wrapped its blocks yet.
        self.named = {name.replace("_checkpoint_wrapped_module.", ""): p for name, p in model.named_parameters()
                      if p.requires_grad}
        self.device = next(iter(self.named.values())).device
        self.generator = torch.Generator(self.device).manual_seed(seed)  # saved: resume replays the rounding
        self.state = {p: _ParamState(p, state_bits == 8) for p in self.named.values()}
        if use_triton is None:
            use_triton = self.device.type == "cuda"
        self.use_triton = use_triton and state_bits == 8  # else the PyTorch code, chunked
        # imported here, not at the top: this module must import where triton is not installed
        self.kernels = importlib.import_module("kernels.adamw_8bit") if self.use_triton else None
        for p in self.named.values():
            p.register_post_accumulate_grad_hook(self._on_grad)
        self.in_step = False

    def begin_step(self, lr: float, micro_steps: int = 1) -> None:
        """Before the first micro-step's forward of an optimizer step; lr is this step's learning rate."""
        self.lr, self.micro_steps = lr, micro_steps
        for st in self.state.values():
            st.backwards_seen = 0
        zero = torch.zeros((), device=self.device)
        self.grad_sq, self.seen_grad_sq, self.seen_prev_grad_sq = zero.clone(), zero.clone(), zero.clone()
        self.total_prev_grad_sq = torch.stack([st.prev_grad_sq for st in self.state.values()]).sum()
        self.skipped = torch.zeros((), dtype=torch.int32, device=self.device)
        self.in_step = True

    def end_step(self) -> torch.Tensor:
        """After the last micro-step's backward. Returns the step's global gradient norm (device tensor)."""
        missed = [name for name, p in self.named.items() if self.state[p].backwards_seen != self.micro_steps]
        if missed:
            raise RuntimeError(f"{missed[:3]}... got a gradient in fewer than all {self.micro_steps} micro-steps: "
                               "their earlier gradients were never applied")
        self.in_step = False
        return self.grad_sq.sqrt()

    def apply(self, finite: bool = True) -> None:
        """Nothing to do: each parameter was updated inside backward, and one whose gradient was not finite
        kept its values (the engine's skip logic needs no undo)."""

    @torch.no_grad()
    def _on_grad(self, p: torch.Tensor) -> None:
        if not self.in_step:
            raise RuntimeError("backward ran outside InBackwardOptimizer.begin_step() ... end_step()")
        st = self.state[p]
        st.backwards_seen += 1
        if st.backwards_seen < self.micro_steps:
            if st.quantized:
                self._accumulate(p.grad.reshape(-1), st)
                p.grad = None
            return
        self._update(p, p.grad.reshape(-1), st)
        p.grad = None

    def _seed(self) -> torch.Tensor:
        return torch.randint(0, 2**31 - 1, (1,), device=self.device, generator=self.generator)

    def _full_grad(self, grad, st, start, end) -> torch.Tensor:
        g = grad[start:end].float()
        return g + st.accumulator.read(start, end) if st.accumulating else g

    def _accumulate(self, grad, st) -> None:
        if st.accumulator is None:
            st.accumulator = BlockQuantized(grad.numel(), True, grad.device)
        acc = st.accumulator
        if self.use_triton:
            self.kernels.accumulate_kernel[(acc.scales.numel(),)](grad, acc.codes, acc.scales, self._seed(),
                                                                  grad.numel(), HAS_ACC=st.accumulating,
                                                                  BLOCK_SIZE=BLOCK)
        else:
            for start, end in _chunks(grad.numel()):
                acc.write(start, self._full_grad(grad, st, start, end), self.generator)
        st.accumulating = True

    def _grad_sq(self, grad, st) -> torch.Tensor:
        if self.use_triton:
            acc = st.accumulator if st.accumulating else st.exp_avg  # a stand-in when there is none
            sums = torch.empty(acc.scales.numel(), device=grad.device)
            self.kernels.grad_sq_kernel[(sums.numel(),)](grad, acc.codes, acc.scales, sums, grad.numel(),
                                                         HAS_ACC=st.accumulating, BLOCK_SIZE=BLOCK)
            return sums.sum()
        return sum(self._full_grad(grad, st, start, end).square().sum() for start, end in _chunks(grad.numel()))

    def _clip_scale(self, st, grad_sq, finite) -> torch.Tensor:
        """min(1, grad_clip / estimated global norm): see the class docstring."""
        if self.grad_clip <= 0:
            return torch.ones((), device=self.device)
        self.seen_grad_sq += torch.where(finite, grad_sq, 0.0)
        self.seen_prev_grad_sq += torch.where(finite, st.prev_grad_sq, 0.0)
        change = torch.where(self.seen_prev_grad_sq > 0, self.seen_grad_sq / self.seen_prev_grad_sq, 1.0)
        estimate = torch.maximum(self.total_prev_grad_sq * change, self.seen_grad_sq).sqrt()
        return (self.grad_clip / (estimate + 1e-6)).clamp(max=1.0)

    def _update(self, p, grad, st) -> None:
        grad_sq = self._grad_sq(grad, st)
        finite = torch.isfinite(grad_sq)
        self.grad_sq += grad_sq
        self.skipped += (~finite).int()
        clip = self._clip_scale(st, grad_sq, finite)
        st.prev_grad_sq = torch.where(finite, grad_sq, st.prev_grad_sq)
        st.step += finite.float()
        step_size = self.lr / (1 - self.betas[0] ** st.step)
        bias_correction2_sqrt = (1 - self.betas[1] ** st.step).sqrt()
        decay = 1 - self.lr * (self.weight_decay if p.ndim >= 2 else 0.0)
        update = self._update_triton if self.use_triton else self._update_torch
        update(p.view(-1), grad, st, clip, step_size, bias_correction2_sqrt, decay, finite)
        st.accumulating = False

    def _update_torch(self, weights, grad, st, clip, step_size, bias_correction2_sqrt, decay, finite) -> None:
        beta1, beta2 = self.betas
        for start, end in _chunks(weights.numel()):
            g = self._full_grad(grad, st, start, end) * clip
            m = st.exp_avg.read(start, end).lerp_(g, 1 - beta1)
            s = st.exp_avg_sqrt.read(start, end).square_().mul_(beta2).addcmul_(g, g, value=1 - beta2).sqrt_()
            w = weights[start:end].float() * decay - step_size * m / (s / bias_correction2_sqrt + self.eps)
            st.exp_avg.write(start, m, self.generator, keep_old=~finite)
            st.exp_avg_sqrt.write(start, s, self.generator, keep_old=~finite)
            weights[start:end] = torch.where(finite, self._round(w, weights.dtype), weights[start:end])

    def _update_triton(self, weights, grad, st, clip, step_size, bias_correction2_sqrt, decay, finite) -> None:
        acc = st.accumulator if st.accumulating else st.exp_avg  # a stand-in when there is none
        scalars = torch.stack([clip, step_size, bias_correction2_sqrt, finite.float()])
        m, s = st.exp_avg, st.exp_avg_sqrt
        self.kernels.adamw_kernel[(m.scales.numel(),)](
            weights, grad, acc.codes, acc.scales, m.codes, m.scales, s.codes, s.scales, scalars, self._seed(),
            weights.numel(), decay, self.betas[0], self.betas[1], self.eps, HAS_ACC=st.accumulating,
            STOCHASTIC_BF16=weights.dtype == torch.bfloat16 and self.stochastic_rounding, BLOCK_SIZE=BLOCK)

    def _round(self, w: torch.Tensor, dtype) -> torch.Tensor:
        if dtype == torch.bfloat16 and self.stochastic_rounding:
            return stochastic_round_to_bf16(w, self.generator)
        return w.to(dtype)

    def state_dict(self) -> dict:
        """Tensors and plain values only (torch.load(weights_only=True) reads it); keyed by parameter name."""
        return {"state_bits": self.state_bits, "generator": self.generator.get_state(),
                "params": {name: self.state[p].tensors() for name, p in self.named.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state["state_bits"] != self.state_bits or state["params"].keys() != self.named.keys():
            raise ValueError("optimizer state is for other parameters or another state_bits")
        for name, p in self.named.items():
            st = self.state[p]
            for key, tensor in st.tensors().items():
                tensor.copy_(state["params"][name][key])
        self.generator.set_state(state["generator"])
