"""Export a phase 7 checkpoint to transformers' LlamaForCausalLM: a rename, since names and shapes match.

python -m phases.phase7.export CHECKPOINT OUT_DIR   (then LlamaForCausalLM.from_pretrained(OUT_DIR))
CHECKPOINT is a .pt file or a checkpoint folder of a run on several ranks.
"""

import sys

from engine.checkpoint import CheckpointError, load_checkpoint
from engine.cli import run_cli
from engine.config import config_from_dict
from phases.phase7.config import model_args
from phases.phase7.model import ModelArgs


def llama_config(args: ModelArgs):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.d_model, intermediate_size=args.ffn_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads, max_position_embeddings=args.max_seq_len,
        rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False,
    )


def hf_state_dict(state_dict: dict) -> dict:
    """Our names are LlamaForCausalLM's without the `model.` prefix of the decoder stack."""
    return {(k if k.startswith("lm_head.") else f"model.{k}"): v for k, v in state_dict.items()}


def to_hf(args: ModelArgs, state_dict: dict):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(llama_config(args))
    model.load_state_dict(hf_state_dict(state_dict), strict=True)
    return model


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit("usage: python -m phases.phase7.export CHECKPOINT OUT_DIR")
    state = load_checkpoint(argv[0])
    if state.get("phase") != "phase7":
        raise CheckpointError(f"{argv[0]} is a '{state.get('phase')}' checkpoint; this exports phase 7 (Llama) only")
    to_hf(model_args(config_from_dict(state["config"])), state["model"]).save_pretrained(argv[1])
    print(f"saved LlamaForCausalLM to {argv[1]}")


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
