"""Export a phase hf checkpoint as a transformers folder: the same architecture, the checkpoint's weights (their
keys are already transformers' own), and the tokenizer. AutoModelForCausalLM.from_pretrained(OUT_DIR) then gives
the logits our model gives.

python -m phases.hf.export CHECKPOINT OUT_DIR   (or make export CHECKPOINT=... OUT=..., for any phase)
"""

import sys

from data.stream import DataError
from engine.checkpoint import CheckpointError, load_checkpoint
from engine.cli import run_cli
from phases import config_from_dict
from phases.hf.config import HFConfig, quiet_transformers
from phases.hf.model import load_transformers_model


def to_transformers(cfg: HFConfig, state_dict: dict):
    """The stock transformers model (SDPA, its own RMSNorm modules) holding the checkpoint's weights, in their
    dtype (fp32; bf16 from memory mode)."""
    model = load_transformers_model(cfg, "sdpa", init="scratch")  # the architecture; the weights come next
    model.load_state_dict(state_dict, strict=True)
    dtype = next(v.dtype for v in state_dict.values() if v.is_floating_point())
    return model.to(dtype).eval()


def save_tokenizer(ref: str, out_dir: str) -> None:
    from data.tokenizer import load_tokenizer

    try:
        load_tokenizer(ref).save_pretrained(out_dir)
    except DataError as e:
        print(f"warning: the weights are saved, the tokenizer is not: {e}", file=sys.stderr)


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit("usage: python -m phases.hf.export CHECKPOINT OUT_DIR")
    state = load_checkpoint(argv[0])
    if state.get("phase") != "hf":
        raise CheckpointError(f"{argv[0]} is a '{state.get('phase')}' checkpoint; this exports phase hf only "
                              "(make export picks the right exporter)")
    cfg = config_from_dict(state["config"])
    model = to_transformers(cfg, state["model"])
    with quiet_transformers():
        model.save_pretrained(argv[1])
    save_tokenizer(state["tokenizer"], argv[1])
    print(f"saved {type(model).__name__} (step {state['step']}) to {argv[1]}")


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
