"""Export a phase 7 checkpoint to transformers' LlamaForCausalLM: a rename, since names and shapes match.

python -m phases.phase7.export CHECKPOINT OUT_DIR   (then LlamaForCausalLM.from_pretrained(OUT_DIR))
"""

import sys

from engine.checkpoint import load_checkpoint
from engine.cli import run_cli
from engine.config import Config, config_from_dict
from phases.phase7.model import ffn_dim_for


def llama_config(cfg: Config):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=ffn_dim_for(cfg),
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads or cfg.n_heads, max_position_embeddings=cfg.n_seq,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False,
    )


def hf_state_dict(state_dict: dict) -> dict:
    """Our names are LlamaForCausalLM's without the `model.` prefix of the decoder stack."""
    return {(k if k.startswith("lm_head.") else f"model.{k}"): v for k, v in state_dict.items()}


def to_hf(cfg: Config, state_dict: dict):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(llama_config(cfg))
    model.load_state_dict(hf_state_dict(state_dict), strict=True)
    return model


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit("usage: python -m phases.phase7.export CHECKPOINT OUT_DIR")
    state = load_checkpoint(argv[0])
    to_hf(config_from_dict(state["config"]), state["model"]).save_pretrained(argv[1])
    print(f"saved LlamaForCausalLM to {argv[1]}")


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
