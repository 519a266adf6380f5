"""Export a phase 7 checkpoint to transformers' LlamaForCausalLM: a rename, since names and shapes match.

python -m phases.phase7.export CHECKPOINT OUT_DIR   (then LlamaForCausalLM.from_pretrained(OUT_DIR))
CHECKPOINT is a .pt file or a checkpoint folder of a run on several ranks.

Llama has no tensor-train embedding: a TT one (embedding=tt) is expanded into the dense embed_tokens table it
stands for, so the export holds vocab x d_model embedding parameters where the checkpoint held the cores.
tie_embeddings=true exports as tie_word_embeddings.

The run's tokenizer is saved beside the weights as training used it: documents were packed as their ids followed
by EOS (data/pack.py), never a BOS and never padding, so EOS also stands for BOS and PAD, and encoding adds no
special token (a Llama tokenizer would add BOS). AutoTokenizer + generate at temperature 0 then give the text
that `make chat` gives from the checkpoint.
"""

import sys

import torch

from data.stream import DataError
from engine.checkpoint import CheckpointError, load_checkpoint
from engine.cli import run_cli
from phases import config_from_dict
from phases.phase7.config import model_args
from phases.phase7.model import ModelArgs
from phases.phase7.tt_embedding import TTEmbedding


def llama_config(args: ModelArgs, eos_id: int | None = None):
    """eos_id: the tokenizer's EOS, which is also BOS and PAD (see the module's docstring); None leaves them unset
    rather than LlamaConfig's defaults (1 and 2), which are ordinary tokens of our vocabularies."""
    from transformers import LlamaConfig

    return LlamaConfig(
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
        vocab_size=args.vocab_size, hidden_size=args.d_model, intermediate_size=args.ffn_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads, max_position_embeddings=args.max_seq_len,
        rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta, tie_word_embeddings=args.tie_embeddings,
        attention_bias=False, mlp_bias=False,
    )


def dense_embedding(args: ModelArgs, state_dict: dict) -> dict:
    """The state dict with a TT embedding's cores replaced by the dense table they stand for, and a tied head's
    lm_head.weight (which our tied models do not store) added as that table."""
    state_dict = dict(state_dict)
    if args.embedding == "tt":
        cores = {k: state_dict.pop(k) for k in [k for k in state_dict if k.startswith("embed_tokens.")]}
        dtype = next(iter(cores.values())).dtype
        tt = TTEmbedding(args.vocab_size, args.d_model, args.tt_rank).to(torch.promote_types(dtype, torch.float32))
        tt.load_state_dict({k.removeprefix("embed_tokens."): v for k, v in cores.items()})
        with torch.no_grad():  # contracted in fp32 at least, stored in the checkpoint's dtype
            state_dict["embed_tokens.weight"] = tt.full_table().to(dtype)
    if args.tie_embeddings:
        state_dict["lm_head.weight"] = state_dict["embed_tokens.weight"]
    return state_dict


def hf_state_dict(state_dict: dict) -> dict:
    """Our names are LlamaForCausalLM's without the `model.` prefix of the decoder stack."""
    return {(k if k.startswith("lm_head.") else f"model.{k}"): v for k, v in state_dict.items()}


def to_hf(args: ModelArgs, state_dict: dict, eos_id: int | None = None):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(llama_config(args, eos_id))
    model.load_state_dict(hf_state_dict(dense_embedding(args, state_dict)), strict=True)
    return model


def training_tokenizer(ref: str):
    """The run's tokenizer with EOS as BOS and PAD and no special token added on encode; None (with a warning)
    when it cannot be loaded here, since the weights are worth saving without it."""
    from data.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(ref)
    except DataError as e:
        print(f"warning: the weights are saved, the tokenizer is not: {e}", file=sys.stderr)
        return None
    tokenizer.bos_token = tokenizer.pad_token = tokenizer.eos_token
    tokenizer.add_bos_token = tokenizer.add_eos_token = False  # rewrites a post-processor that would add them
    return tokenizer


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit("usage: python -m phases.phase7.export CHECKPOINT OUT_DIR")
    state = load_checkpoint(argv[0])
    if state.get("phase") != "phase7":
        raise CheckpointError(f"{argv[0]} is a '{state.get('phase')}' checkpoint; this exports phase 7 (Llama) only")
    args = model_args(config_from_dict(state["config"]))
    if args.attention_geometry == "hyperbolic":
        raise CheckpointError(f"{argv[0]} uses attention_geometry=hyperbolic: transformers' Llama has no "
                              "hyperbolic attention, so it cannot be exported")
    tokenizer = training_tokenizer(state.get("tokenizer", ""))
    eos_id = None if tokenizer is None else tokenizer.eos_token_id
    to_hf(args, state["model"], eos_id).save_pretrained(argv[1])
    if tokenizer is not None:
        tokenizer.save_pretrained(argv[1])
    if args.embedding == "tt":
        print(f"note: the TT embedding (rank {args.tt_rank}) was expanded to a dense {args.vocab_size} x "
              f"{args.d_model} embed_tokens table for transformers, which has no TT embedding")
    print(f"saved LlamaForCausalLM{' (tie_word_embeddings)' if args.tie_embeddings else ''}"
          f"{'' if tokenizer is None else f' and its tokenizer (EOS {eos_id}, also BOS and PAD)'} to {argv[1]}")


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
