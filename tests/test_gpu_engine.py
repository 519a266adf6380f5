"""The engine on CUDA with everything on: Triton kernels inside the model, compiled blocks, memory mode.

Marked gpu: skipped (and reported as skipped) on CPU machines. The kernels' own checks are in test_kernels.py;
these check that the pieces work together in a training run.
"""

import json
import math

import pytest
import torch

from engine.train import Trainer
from phases import load_config
from phases.phase7 import build_model

pytestmark = pytest.mark.gpu
SMALL = ["vocab_size=64", "n_seq=256", "d_model=256", "n_heads=2", "n_layers=2", "ffn_dim=512", "device=cuda"]


@pytest.mark.parametrize("compiled", [False, True])
def test_triton_model_matches_the_pytorch_model(compiled):
    """Triton attention + RMSNorm (with the fused residual add) against SDPA + the PyTorch RMSNorm; compiled
    with fullgraph=True, which fails if a block does not compile into one graph around the kernels."""
    batch = torch.randint(0, 64, (2, 256), device="cuda")
    outputs = []
    for attention, norm in (("triton", "triton"), ("sdpa", "torch")):
        torch.manual_seed(0)
        model = build_model(load_config(None, SMALL + [f"attention={attention}", f"rms_norm={norm}"])).cuda()
        if compiled:
            for layer in model.layers:
                layer.compile(fullgraph=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(batch).float()
        logits.square().mean().backward()
        outputs.append((logits, [p.grad.float() for p in model.parameters()]))
        assert (model.args.attention, model.args.rms_norm) == (attention, norm)
    (ours, our_grads), (peer, peer_grads) = outputs
    torch.testing.assert_close(ours, peer, atol=3e-2, rtol=3e-2)
    for a, b in zip(our_grads, peer_grads):
        assert (a - b).norm() <= 0.05 * b.norm() + 1e-6


@pytest.mark.parametrize("memory_mode", [False, True])
def test_compiled_triton_training_learns(markov_data, tmp_path, memory_mode):
    cfg = load_config(None, SMALL + [f"data={markov_data}", "n_seq=128", "batch_size=16",
                                     "gradient_accumulation_steps=2", "max_steps=60", "warmup_steps=10",
                                     "learning_rate=3e-3", "log_every=10", "eval_every=60", "eval_batches=4",
                                     "save_every=60", "use_compile=true",
                                     "use_gradient_checkpointing=true", f"memory_mode={memory_mode}",
                                     f"out_dir={tmp_path / 'run'}"])
    Trainer(cfg).fit()
    log = json.loads((tmp_path / "run" / "training_log.json").read_text())
    assert log[-1]["val_loss"] < 0.45 * math.log(64)


def test_auto_micro_batch_fits_a_small_model_in_one_micro_step(markov_data):
    cfg = load_config(None, SMALL + [f"data={markov_data}", "n_seq=128", "batch_size=4",
                                     "gradient_accumulation_steps=8", "micro_batch_size=auto", "fast_dev_run=2",
                                     "memory_mode=true"])
    trainer = Trainer(cfg)
    assert (trainer.micro_batch_size, trainer.accumulation_steps) == (32, 1)  # 2 layers x 256 wide: fits anywhere
    trainer.fit()
