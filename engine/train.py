"""The training loop shared by every phase: python -m engine.train [CONFIG.yaml] [key=value ...]

Reads top to bottom: build the phase's model, open data, (resume), then per step: micro-batches under
autocast, backward, the optimizer's step (engine/optim.py), log, evaluate, save. The phase decides the model,
its config keys and the loss only.

The same loop runs on N ranks under torchrun (`make train ... NPROC=N`): the model is sharded with FSDP2
(engine/distributed.py), rank r takes the r-th slice of each micro-step's windows, the loss is averaged over
ranks, only rank 0 prints and writes logs, and checkpoints are Distributed Checkpoint folders.

SIGTERM or SIGUSR1 (what Slurm, Kubernetes and scancel send before they kill a job) stop the run after the
step in progress: every rank saves a checkpoint, `latest` names it, and the process exits with PREEMPTED_EXIT,
so that a requeued job's resume=auto continues from it.
"""

import contextlib
import gc
import json
import math
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from engine import checkpoint as ckpt
from engine.blocks import apply_to_blocks
from engine.cli import run_cli
from engine.config import Config, dump_config
from engine.distributed import build_sharded_model, check_supported, init_world, rank_seed, shutdown
from engine.errors import UserError
from engine.init import build_initialised
from engine.optim import build_optimizer, prepare_parameters
from engine.plot import save_loss_plot
from phases import get_phase, load_config

PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "H800": 989.4e12, "A100": 312e12, "L40S": 362e12}


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# 128 + SIGTERM, what a shell reports for a process SIGTERM ended: non-zero, so Kubernetes restarts the pod
# (a podFailurePolicy can match it) and a Slurm script requeues, where 0 would mark the job done.
PREEMPTED_EXIT = 128 + signal.SIGTERM


class TrainingError(UserError):
    """The run cannot go on (e.g. the loss keeps diverging); the message says what to change."""


def lr_at(step: int, cfg: Config) -> float:
    """Linear warm-up to learning_rate, then cosine decay to min_lr at max_steps. Steps count from 1."""
    if step <= cfg.warmup_steps:
        return cfg.learning_rate * step / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def budget_flops(n_params: int, tokens: int) -> float:
    """Training compute by SMDM's convention C = 6 N D (N: parameters other than the input embedding)."""
    return 6 * n_params * tokens


def steps_for_budget(cfg: Config, n_params: int, world_size: int = 1) -> int:
    """max_steps from a compute budget (the tokens of all ranks count)."""
    tokens = cfg.tokens_per_step(world_size)
    flops_per_step = budget_flops(n_params, tokens)
    steps = int(cfg.flops_budget // flops_per_step)
    if steps < 1:
        raise TrainingError(f"flops_budget={cfg.flops_budget:.3g} is less than one step "
                            f"({flops_per_step:.3g} FLOPs = 6 x {n_params:,} params x {tokens:,}"
                            " tokens): raise the budget or shrink the model or batch")
    return steps


def steps_for_epochs(cfg: Config, train_tokens: int, world_size: int = 1) -> int:
    """max_steps for cfg.epochs passes over the training tokens (the last step may run past the end)."""
    return max(1, math.ceil(cfg.epochs * train_tokens / cfg.tokens_per_step(world_size)))


def pick_device(cfg: Config) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device=cuda but CUDA is not available: run `make check-env`, or use device=cpu")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def autocast_for(cfg: Config, device: torch.device):
    """bf16 autocast on CUDA; CPU runs in fp32 so tests are exact and portable."""
    if device.type == "cuda" and cfg.use_mixed_precision:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def stop_signals():
    """While the loop runs, SIGTERM and SIGUSR1 are noted (in the list yielded) instead of ending the process
    mid-step; the loop reads the list after each step. Only the main thread can install handlers."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in STOP_SIGNALS}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def to_cpu(state):
    """A copy of a (nested) state dict with every tensor on the CPU."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: to_cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(to_cpu(v) for v in state)
    return state


def open_wandb(cfg: Config):
    """A wandb run, online only when the user is logged in, so a run never blocks on the network."""
    import wandb

    mode = "online" if wandb.login(prompt=False, verify=False) else "offline"  # a stored key; no network call
    return wandb.init(project="llm-pretrain", name=cfg.experiment or Path(cfg.out_dir).name, dir=cfg.out_dir,
                      tags=[t for t in cfg.tags.split(",") if t], notes=cfg.notes, config=cfg.to_dict(), mode=mode)


class Trainer:
    """Owns one run: model, optimizer, data streams, counters, run folder."""

    def __init__(self, cfg: Config):
        from data.loader import open_data

        self.cfg = cfg
        self.phase = get_phase(cfg.phase)
        if self.phase.resolve_config is not None:  # keys the phase fills in (e.g. from a model's config)
            self.phase.resolve_config(cfg)
        # World(): one process; under torchrun this rank's place, and its own GPU
        self.world, self.device = init_world(pick_device(cfg))
        if self.world.active:
            check_supported(cfg)
        self.out_dir = Path(cfg.out_dir)
        self.saving = cfg.fast_dev_run == 0
        if self.saving and self.world.rank == 0:
            removed = ckpt.remove_leftovers(self.out_dir)
            if removed:
                print(f"removed leftovers of interrupted saves in {self.out_dir}/: {', '.join(removed)}")
        # .pt files on one process, folders on several ranks: the checkpointer knows which, the loop never asks
        self.checkpointer = ckpt.Checkpointer(self.out_dir, self.world, self.device, cfg.keep_last)
        self.resume_from = self.checkpointer.to_resume_from(cfg.resume)  # resume=auto: the newest, if any
        resume_state = None
        if self.resume_from:  # its plain values, checked before building anything, so a wrong checkpoint fails fast
            resume_state = ckpt.load_checkpoint(self.resume_from, lazy=True)
            ckpt.check_compatible(resume_state, cfg, self.resume_from)
        self.writes_files = self.saving and self.world.rank == 0  # logs, plots, config: rank 0 alone
        torch.manual_seed(cfg.seed)
        self.train_data = open_data(cfg.data, "train", cfg.n_seq, cfg.seed, cfg.vocab_size, cfg.tokenizer)
        self.val_data = open_data(cfg.data, "val", cfg.n_seq, cfg.seed, cfg.vocab_size, cfg.tokenizer)
        if self.train_data.vocab_size > cfg.vocab_size:
            raise TrainingError(f"the data's tokenizer has {self.train_data.vocab_size} ids but vocab_size="
                                f"{cfg.vocab_size}: set vocab_size={self.train_data.vocab_size} or larger")
        self.model = self.build_model()
        self.tokens_per_step = cfg.tokens_per_step(self.world.size)
        if cfg.flops_budget > 0:
            cfg.max_steps = steps_for_budget(cfg, self.model.num_params(), self.world.size)
        if cfg.epochs > 0:
            cfg.max_steps = steps_for_epochs(cfg, self.train_data.num_tokens, self.world.size)
        self.optimizer = build_optimizer(self.model, cfg, self.device)
        # sequences_drawn counts the training sequences used: a skipped step's batches are not drawn again
        self.step, self.tokens_seen, self.sequences_drawn, self.best_val_loss = 0, 0, 0, float("inf")
        self.log: list[dict] = []
        self.stopped = False  # by a stop signal, after saving (fit)
        self.micro_batch_size, self.accumulation_steps = self.split_of_each_step()
        if resume_state is not None:
            self.resume(resume_state)
        elif self.world.active:  # each rank its own random stream (mdm's noise), from the run's seed
            torch.manual_seed(rank_seed(cfg.seed, self.world.rank))
        if not self.world.active:  # a sharded model got them before sharding
            apply_to_blocks(self.model, cfg, self.device)
        self.eval_loss = self.phase.eval_loss or self.phase.loss
        self.flops_per_token = self.model.flops_per_token(cfg.n_seq)
        self.peak_flops = peak_flops(self.device)

    def build_model(self) -> torch.nn.Module:
        """The phase's model on this process's device with its initial weights for cfg.seed (a checkpoint's
        are loaded over them later); under torchrun sharded over the ranks, its blocks wrapped first. Built
        on the meta device and initialised by its own init_weights in both cases, so N ranks start from the
        weights 1 process would."""
        if self.world.active:
            return build_sharded_model(self.phase, self.cfg, self.device, self.world,
                                       lambda model: apply_to_blocks(model, self.cfg, self.device))
        model = build_initialised(self.phase, self.cfg)
        prepare_parameters(model, self.cfg)
        return model.to(self.device)

    def split_of_each_step(self) -> tuple[int, int]:
        """(micro-batch size, micro-batches per step): the config's, or its micro_batch_size re-split."""
        cfg = self.cfg
        per_step = cfg.batch_size * cfg.gradient_accumulation_steps
        if cfg.micro_batch_size == "":
            return cfg.batch_size, cfg.gradient_accumulation_steps
        if cfg.micro_batch_size != "auto":
            size = int(cfg.micro_batch_size)
        elif self.device.type != "cuda":
            size = cfg.batch_size
            print(f"micro_batch_size=auto: no GPU memory to fit, micro-batches of {size} as configured")
        else:
            size = self.largest_micro_batch_that_fits(per_step)
            print(f"micro_batch_size=auto: {size} sequences x {per_step // size} micro-steps per step fit")
        return size, per_step // size

    def largest_micro_batch_that_fits(self, per_step: int) -> int:
        """Try one real training micro-step at each divisor of per_step, largest first, until one does not run
        out of memory; then put the weights, optimizer and RNG back as they were, so trying left no trace."""
        saved = {"model": to_cpu(self.model.state_dict()), "optimizer": to_cpu(self.optimizer.state_dict()),
                 "rng": ckpt.rng_state()}
        try:
            for size in (n for n in range(per_step, 0, -1) if per_step % n == 0):
                if self.micro_step_fits(size):
                    return size
            raise TrainingError("even micro-batch 1 runs out of GPU memory: set use_gradient_checkpointing=true "
                                "or memory_mode=true, or shrink the model or n_seq")
        finally:
            self.model.load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
            ckpt.restore_rng(saved["rng"])
            self.sequences_drawn = 0

    def micro_step_fits(self, size: int) -> bool:
        self.micro_batch_size, self.accumulation_steps = size, 1
        try:
            self.forward_backward()
            self.optimizer.apply(finite=False)
            if self.device.type == "cuda":
                torch.cuda.synchronize()  # an asynchronous failure surfaces here, not in the real run
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            self.model.zero_grad(set_to_none=True)
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def resume(self, state: dict) -> None:
        """The checkpoint's weights, optimizer state and RNG (each rank its own), then its counters from `state`,
        its plain values."""
        rng_restored = self.checkpointer.load(self.resume_from, self.model, self.optimizer, self.cfg.verify_checksums)
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        # Checkpoints before micro_batch_size counted micro-batches of the saved batch_size instead.
        self.sequences_drawn = state.get("sequences_drawn",
                                         state.get("data_position", 0) * state["config"]["batch_size"])
        self.best_val_loss = state["best_val_loss"]
        if not rng_restored:  # a rank the checkpoint's run did not have
            torch.manual_seed(rank_seed(self.cfg.seed, self.world.rank, self.step))
        log_file = self.out_dir / "training_log.json"
        if log_file.is_file():  # keep the history up to the checkpoint; later records are replayed
            self.log = [r for r in json.loads(log_file.read_text()) if r["step"] <= self.step]
        print(f"Resumed from {self.resume_from} at step {self.step} ({self.tokens_seen:,} tokens seen)")

    def train_state(self) -> dict:
        """A checkpoint's plain values (a checkpoint folder's train_state.json; its tensors are in its shards)."""
        return {"phase": self.phase.name, "config": self.cfg.to_dict(), "step": self.step,
                "tokens_seen": self.tokens_seen, "sequences_drawn": self.sequences_drawn,
                "best_val_loss": self.best_val_loss, "tokenizer": self.cfg.tokenizer}

    def save(self, name: str) -> None:
        if self.saving:
            self.checkpointer.save(f"{self.phase.name}_{name}", self.model, self.optimizer, self.train_state())

    def batch(self, stream, first: int, size: int) -> torch.Tensor:
        """Windows first..first+size-1 of a stream, on the device."""
        tokens = stream.batch(first, size)
        if self.device.type == "cuda":
            return tokens.pin_memory().to(self.device, non_blocking=True)
        return tokens.to(self.device)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over eval_batches fixed batches of batch_size x ranks windows, each rank scoring its slice."""
        self.model.eval()
        size, world = self.cfg.batch_size, self.world
        total = torch.zeros((), device=self.device)
        with autocast_for(self.cfg, self.device):
            for i in range(self.cfg.eval_batches):
                batch = self.batch(self.val_data, (i * world.size + world.rank) * size, size)
                total += self.eval_loss(self.model, batch, self.cfg).float()
        self.model.train()
        return world.mean(total).item() / self.cfg.eval_batches

    def forward_backward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward over the step's micro-batches; returns (loss, grad norm) as device tensors.
        self.optimizer.apply() then updates (or drops the update)."""
        cfg, accum, size = self.cfg, self.accumulation_steps, self.micro_batch_size
        self.optimizer.begin_step(lr_at(self.step + 1, cfg), accum)
        if self.phase.on_step is not None:
            self.phase.on_step(self.model, self.step + 1, cfg)
        loss_sum = torch.zeros((), device=self.device)
        for _ in range(accum):
            # Windows are numbered consecutively from the start of the run, so any split draws each once;
            # of a micro-step's ranks x size windows, rank r takes the r-th slice (FSDP averages the gradients).
            batch = self.batch(self.train_data, self.sequences_drawn + self.world.rank * size, size)
            self.sequences_drawn += size * self.world.size
            with autocast_for(cfg, self.device):
                loss = self.phase.loss(self.model, batch, cfg) / accum
            loss.backward()
            loss_sum += loss.detach()
        # Averaged over ranks: every rank then takes the same decision on a non-finite step
        return self.world.mean(loss_sum), self.optimizer.end_step()

    def stop_requested(self, received: list[int]) -> bool:
        """Whether any rank got a stop signal: every rank then stops after the same step."""
        if not self.world.active:
            return bool(received)
        import torch.distributed as dist

        flag = torch.tensor(float(bool(received)), device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0

    def stop(self, received: list[int]) -> None:
        """After a stop signal: save this step on every rank (if its save_every save has not), name it `latest`."""
        name = f"step_{self.step}"
        if self.step % self.cfg.save_every != 0:
            self.save(name)
        self.checkpointer.wait()
        what = signal.Signals(received[0]).name if received else "stop signal (another rank's)"
        saved = self.checkpointer.path_of(f"{self.phase.name}_{name}")
        if self.saving:
            print(f"{what}: stopped after step {self.step} and saved {saved}; exiting with code {PREEMPTED_EXIT} "
                  "(resume=auto continues from it)", flush=True)
        else:
            print(f"{what}: stopped after step {self.step} (fast_dev_run saves nothing); "
                  f"exiting with code {PREEMPTED_EXIT}", flush=True)
        if self.wandb is not None:
            self.wandb.finish()
        self.stopped = True

    def fit(self) -> None:
        """Train to the last step, or until a stop signal (then self.stopped, see stop)."""
        with stop_signals() as received:
            self.train_until_done(received)

    def train_until_done(self, received: list[int]) -> None:
        cfg = self.cfg
        if self.saving:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.writes_files:
            (self.out_dir / "config.yaml").write_text(dump_config(cfg))
        self.print_header()
        self.wandb = open_wandb(cfg) if cfg.logger == "wandb" and self.writes_files else None
        self.model.train()
        bad_steps, window_start, window_tokens = 0, time.perf_counter(), 0
        last_step = cfg.fast_dev_run if cfg.fast_dev_run else cfg.max_steps
        while self.step < last_step:
            loss, grad_norm = self.forward_backward()
            # One host sync per optimizer step (never per micro-step): skip non-finite updates.
            if not torch.isfinite(loss + grad_norm):
                self.optimizer.apply(finite=False)
                bad_steps += 1
                print(f"Step {self.step + 1:6d} | non-finite loss or gradient: update skipped "
                      f"({bad_steps}/{cfg.max_bad_steps})")
                if bad_steps >= cfg.max_bad_steps:
                    raise TrainingError(f"loss was NaN/Inf for {bad_steps} steps in a row at step {self.step + 1}:"
                                        f" lower learning_rate or check the data; checkpoints in {self.out_dir}"
                                        " are from before the divergence")
                continue
            bad_steps = 0
            self.optimizer.apply()
            self.step += 1
            self.tokens_seen += self.tokens_per_step
            window_tokens += self.tokens_per_step

            val_loss = None
            if self.step % cfg.eval_every == 0 or self.step == last_step:
                val_loss = self.evaluate()
            if self.step % cfg.log_every == 0 or val_loss is not None:
                elapsed = time.perf_counter() - window_start
                self.log_step(loss.item(), grad_norm.item(), elapsed, window_tokens, val_loss)
                if val_loss is not None and self.writes_files:  # after `elapsed` was taken: not counted in tok/s
                    save_loss_plot(self.out_dir, self.log)
                window_start, window_tokens = time.perf_counter(), 0
            if val_loss is not None and val_loss < self.best_val_loss:
                self.best_val_loss = val_loss
                self.save("best")
            if self.step % cfg.save_every == 0:
                self.save(f"step_{self.step}")
            if self.stop_requested(received):
                self.stop(received)
                return
        self.save("final")
        self.checkpointer.wait()  # the last background save, complete and named by `latest`
        if self.wandb is not None:
            self.wandb.finish()
        if self.saving:
            print(f"Done: step {self.step}, checkpoints in {self.out_dir}/")

    def log_step(self, loss, grad_norm, elapsed, window_tokens, val_loss) -> None:
        steps = window_tokens // self.tokens_per_step
        tok_per_s = window_tokens / elapsed  # of all ranks
        line = (f"Step {self.step:6d} | Loss: {loss:.4f} | PPL: {math.exp(min(loss, 50)):.2f} | "
                f"LR: {lr_at(self.step, self.cfg):.2e} | Grad: {grad_norm:.3f} | Time: {elapsed / steps:.2f}s"
                f" | tok/s: {tok_per_s:,.0f}")
        record = {"step": self.step, "loss": loss, "lr": lr_at(self.step, self.cfg), "grad_norm": grad_norm,
                  "time": elapsed / steps, "tokens": self.tokens_seen, "tok_per_s": tok_per_s}
        if self.world.active:
            record["tok_per_s_per_gpu"] = tok_per_s / self.world.size
            line += f" ({record['tok_per_s_per_gpu']:,.0f}/{'GPU' if self.device.type == 'cuda' else 'rank'})"
        if self.peak_flops:
            record["mfu"] = tok_per_s * self.flops_per_token / (self.peak_flops * self.world.size)
            line += f" | MFU: {record['mfu']:.2f}"
        if self.cfg.flops_budget > 0:
            record["flops"] = budget_flops(self.model.num_params(), self.tokens_seen)
            line += f" | FLOPs: {record['flops']:.2e}"
        if val_loss is not None:
            record["val_loss"] = val_loss
            line += f" | Val: {val_loss:.4f}"
        print(line, flush=True)
        self.log.append(record)
        if self.wandb is not None:
            self.wandb.log(record, step=self.step)
        if self.writes_files:
            ckpt.save_json(self.out_dir / "training_log.json", self.log)

    def print_header(self) -> None:
        cfg, model = self.cfg, self.model
        ranks = f"{self.world.size} rank{'s' if self.world.size > 1 else ''} x " if self.world.active else ""
        if cfg.flops_budget > 0:
            print(f"flops_budget {cfg.flops_budget:.3g} = 6 x {model.num_params():,} params x "
                  f"{cfg.max_steps * self.tokens_per_step:,} tokens -> {cfg.max_steps} steps")
        if cfg.epochs > 0:
            print(f"epochs {cfg.epochs:g} x {self.train_data.num_tokens:,} train tokens -> {cfg.max_steps} steps")
        print(f"{cfg.experiment + ' | ' if cfg.experiment else ''}phase {self.phase.name} | "
              f"{model.num_params(exclude_embedding=False) / 1e6:.1f}M params "
              f"({model.num_params() / 1e6:.1f}M without the input embedding) | device {self.device} | "
              f"{model.describe()}{' | memory mode' if cfg.memory_mode else ''} | "
              f"data {cfg.data} ({self.train_data.num_tokens:,} train tokens) | "
              f"{self.tokens_per_step:,} tokens/step ({ranks}micro-batch {self.micro_batch_size} x "
              f"{self.accumulation_steps} accumulation step{'s' if self.accumulation_steps > 1 else ''} x "
              f"{cfg.n_seq} tokens) | "
              + (f"fast_dev_run: {cfg.fast_dev_run} steps, saves nothing" if cfg.fast_dev_run else
                 f"{cfg.max_steps} steps -> {cfg.out_dir}"), flush=True)


def main(argv: list[str]) -> None:
    config_path = argv[0] if argv and "=" not in argv[0] else None
    cfg = load_config(config_path, argv[1:] if config_path else argv)
    if cfg.print_config:
        print(dump_config(cfg), end="")
        return
    trainer = Trainer(cfg)
    trainer.fit()
    shutdown()  # under torchrun; a failure leaves the group to torchrun, which stops every rank
    if trainer.stopped:
        sys.exit(PREEMPTED_EXIT)


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
