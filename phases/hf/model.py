"""Any transformers causal LM as the engine's LanguageModel: loading its weights with one-line errors, and a thin
wrapper (its transformers config is read in phases/hf/config.py).

HFCausalLM registers the transformers model's own children (Qwen3ForCausalLM: `model`, `lm_head`) as its
children, so its state_dict keys are transformers' keys: export is save_pretrained of the same weights. `layers`
is the model's own ModuleList of decoder layers, so what the engine applies per block (torch.compile,
checkpointing, FSDP) replaces entries inside the transformers model, which then runs them.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from engine.config import ConfigError
from engine.init import copy_whole, parameter_seed
from phases.hf.config import (HFConfig, attention_backend, from_folder_or_hub, head_dim, load_hf_config, norm_backend,
                              quiet_transformers, text_config)
from phases.phase7.model import dense_flops_per_token

def load_transformers_model(cfg: HFConfig, attn_implementation: str, init: str | None = None):
    """AutoModelForCausalLM in fp32 (the engine's weights; memory mode makes them bf16), pretrained or fresh
    (seeded by the torch RNG) with cfg.vocab_size ids."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoModelForCausalLM

    config = load_hf_config(cfg.model_name)
    if not MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]._supports_attention_backend:
        attn_implementation = "sdpa"  # modeling code that does not dispatch through AttentionInterface
    # On the meta device only the architecture: HFCausalLM.init_weights gives the weights, pretrained too
    if (init or cfg.init) == "scratch" or building_on_meta():
        text_config(config).vocab_size = cfg.vocab_size or text_config(config).vocab_size
        with quiet_transformers():
            return AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                    attn_implementation=attn_implementation)

    def load(source, local_files_only):
        with quiet_transformers():
            return AutoModelForCausalLM.from_pretrained(source, config=config, dtype=torch.float32,
                                                        attn_implementation=attn_implementation,
                                                        local_files_only=local_files_only)

    try:
        return from_folder_or_hub(load, cfg.model_name)
    except OSError as e:
        raise ConfigError(f"{cfg.model_name} has a config but no weights that load ({str(e).splitlines()[0][:160]}):"
                          " download the weights, or use init=scratch for its architecture with fresh weights"
                          ) from None


def building_on_meta() -> bool:
    return torch.get_default_device().type == "meta"


def decoder_layers(model, name: str) -> nn.ModuleList:
    """The base model's ModuleList with one entry per hidden layer (layers in Llama/Qwen, h in GPT-2)."""
    n_layers = text_config(model.config).num_hidden_layers
    for child in model.base_model.children():
        if isinstance(child, nn.ModuleList) and len(child) == n_layers:
            return child
    raise ConfigError(f"cannot find the decoder layers of {name} ({type(model).__name__}): no ModuleList of "
                      f"{n_layers} layers in its base model")


@torch.no_grad()
def logits_are_head_of_hidden(model) -> bool:
    """Whether the model's logits are lm_head(final hidden states) with nothing after (no softcapping or logit
    scale, no bias): then the loss may apply lm_head itself, fused with the cross-entropy. Probed on 4 tokens."""
    head = model.lm_head
    if not isinstance(head, nn.Linear) or head.bias is not None:
        return False
    was_training = model.training
    model.eval()
    ids = torch.arange(4, device=model.embedding.weight.device)[None] % head.out_features
    logits = model(ids)  # through the wrapper: under FSDP its hooks gather what each call needs
    same = torch.allclose(logits, F.linear(model.hidden_states(ids), model.output_weight()), rtol=1e-4, atol=1e-5)
    model.train(was_training)
    return same


class HFCausalLM(nn.Module):
    """phases.LanguageModel around a transformers causal LM (kept in self.hf, not registered: see the module doc)."""

    def __init__(self, model, cfg: HFConfig, attention: str, rms_norm: str, fused_loss: bool):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        # Plain attributes, not registered again (that would repeat their keys in the state_dict):
        self.__dict__["hf"] = model
        self.__dict__["layers"] = decoder_layers(model, cfg.model_name)
        self.__dict__["lm_head"] = model.get_output_embeddings()
        self.__dict__["embedding"] = model.get_input_embeddings()
        self.__dict__["cfg"] = cfg
        self.source, self.init = cfg.model_name, cfg.init
        self.attention, self.rms_norm, self.fused_loss = attention, rms_norm, fused_loss

    @torch.no_grad()
    def init_weights(self, seed: int):
        """transformers' own _init_weights, module by module: a module's parameters drawn whole on the CPU from
        torch's RNG seeded by (seed, the module's name), this rank keeping its shards (engine/init.py), so the
        weights do not depend on the sharding; rotary tables computed there too. A pretrained model's weights
        then replace them: read by rank 0 alone and sent to each rank's shards (a file's, not an
        initialisation's; every rank reading whole files would cost each the whole model in memory). Then
        whether the loss may apply lm_head itself (logits_are_head_of_hidden), which needs weights."""
        if not isinstance(self.lm_head.weight, DTensor):
            self.hf.tie_weights()  # to_empty gave each module its own tensor (FSDP keeps a tied pair one)
        with torch.random.fork_rng(devices=[]):
            for name, module in self.hf.named_modules():
                own = dict(module.named_parameters(recurse=False))
                whole = {key: nn.Parameter(torch.empty(p.shape, dtype=p.dtype)) for key, p in own.items()}
                module._parameters.update(whole)
                torch.manual_seed(parameter_seed(seed, name))
                self.hf._init_weights(module)
                module._parameters.update(own)
                for key, p in own.items():
                    copy_whole(p, whole[key].data)
        if self.init != "scratch":
            self.load_pretrained()
        if self.fused_loss and not logits_are_head_of_hidden(self):
            self.fused_loss = False
            print(f"fused_cross_entropy: {self.source}'s logits are more than lm_head(hidden states) (a bias, a "
                  "scale or softcapping), so the loss uses the model's full logits")

    def load_pretrained(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        sharded = isinstance(self.lm_head.weight, DTensor)
        if not sharded or torch.distributed.get_rank() == 0:
            whole = load_transformers_model(self.cfg, self.hf.config._attn_implementation).state_dict()
        else:
            whole = {}
        set_model_state_dict(self, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=sharded))

    def input_embedding(self) -> nn.Module | None:
        """The input embedding, which FSDP shards as a unit of its own; None when tied to lm_head."""
        return None if self.lm_head.weight is self.embedding.weight else self.embedding

    def train(self, mode: bool = True):
        super().train(mode)
        self.hf.training = mode  # the unregistered top module's own flag
        return self

    def hidden_states(self, idx, cache=None, start: int = 0):
        """Final-normed hidden states of the base model. Decoding goes through forward() with transformers' cache."""
        if cache is not None:
            raise NotImplementedError("phase hf decodes with transformers' own cache (phases.hf.generate)")
        return self.hf.base_model(input_ids=idx, use_cache=False).last_hidden_state

    def forward(self, idx):
        """The logits exactly as transformers computes them."""
        return self.hf(input_ids=idx, use_cache=False).logits

    def output_weight(self) -> torch.Tensor:
        return self.lm_head.weight

    def num_params(self, exclude_embedding: bool = True) -> int:
        """With tied embeddings the input embedding is also the output head, whose matmul every token pays: then
        excluding the embedding keeps it, once."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.embedding.weight.numel()
            if self.lm_head.weight is self.embedding.weight:
                n += self.lm_head.weight.numel()
        return n

    def flops_per_token(self, n_seq: int) -> float:
        config = text_config(self.hf.config)
        attention_width = config.num_attention_heads * head_dim(config)  # Qwen3-0.6B: 2048, twice its hidden size
        return dense_flops_per_token(self.num_params(), config.num_hidden_layers, attention_width, n_seq)

    def describe(self) -> str:
        return (f"{self.hf.config.model_type} from {self.source} ({self.init}) | attention {self.attention} | "
                f"rms_norm {self.rms_norm} | cross-entropy {'fused' if self.fused_loss else 'on the full logits'}")


def build(cfg: HFConfig) -> HFCausalLM:
    """The model with our kernels where they run: attention by attn_implementation, RMSNorm by module swap."""
    from phases.hf.extensions import register_attention, replace_rms_norms

    config = text_config(load_hf_config(cfg.model_name))
    attention = attention_backend(cfg, head_dim(config))
    implementation = register_attention() if attention == "triton" else attention
    model = load_transformers_model(cfg, implementation)
    if model.config._attn_implementation != implementation:
        attention = model.config._attn_implementation  # the modeling code cannot take ours
    rms_norm = norm_backend(cfg, config.hidden_size)
    if rms_norm == "triton" and not replace_rms_norms(model):
        rms_norm = "torch (no Llama-style RMSNorm modules)"
    wrapped = HFCausalLM(model, cfg, attention, rms_norm, cfg.fused_cross_entropy)
    if cfg.fused_cross_entropy and not building_on_meta() and not logits_are_head_of_hidden(wrapped):
        wrapped.fused_loss = False  # on the meta device, decided by init_weights
        print(f"fused_cross_entropy: {cfg.model_name}'s logits are more than lm_head(hidden states) (a bias, a scale "
              "or softcapping), so the loss uses the model's full logits")
    return wrapped

