import torch

from engine.blocks import checkpoint_blocks
from engine.sampling import SamplingSettings, filter_logits
from phases import load_config
from phases.phase7 import build_model, generate, next_token_loss
from phases.phase7.export import to_hf

TINY = ["vocab_size=97", "d_model=64", "n_heads=4", "n_layers=2", "n_seq=40", "ffn_dim=96"]


def tiny(*extra):
    torch.manual_seed(0)
    return build_model(load_config(None, TINY + list(extra)))


def loss_of(model, batch):
    return next_token_loss(model, batch, load_config(None, TINY))


def test_future_tokens_do_not_change_past_logits():
    for backend in ("sdpa", "eager"):
        model = tiny(f"attention={backend}").eval()
        x = torch.randint(0, 97, (2, 30))
        changed = x.clone()
        changed[:, 20:] = torch.randint(0, 97, (2, 10))
        a, b = model(x), model(changed)
        torch.testing.assert_close(a[:, :20], b[:, :20])
        assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_attention_backends_agree():
    x = torch.randint(0, 97, (2, 33))
    torch.testing.assert_close(tiny("attention=sdpa")(x), tiny("attention=eager")(x), atol=1e-5, rtol=1e-4)


def test_fused_projections_give_the_same_loss_and_gradients():
    """One matmul for q/k/v (grouped kv heads: unequal widths) and gate/up, against one per projection."""
    batch = torch.randint(0, 97, (2, 41))
    results = []
    for fused in ("true", "false"):
        model = tiny("n_kv_heads=2", f"fused_projections={fused}")
        loss = loss_of(model, batch)
        loss.backward()
        results.append((loss, {name: p.grad for name, p in model.named_parameters()}))
    (fused_loss, fused_grads), (plain_loss, plain_grads) = results
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-6, atol=0)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-7, msg=lambda m: f"{name}: {m}")
        assert fused_grads[name].is_contiguous()  # the optimizers' fused kernels expect it


def test_export_to_hf_llama_is_a_rename_with_same_logits():
    model = tiny("n_kv_heads=2").eval()
    hf = to_hf(model.args, model.state_dict()).eval()
    x = torch.randint(0, 97, (2, 25))
    torch.testing.assert_close(model(x), hf(x).logits, atol=2e-5, rtol=1e-4)


def test_tiny_model_overfits_one_batch():
    model = tiny()
    batch = torch.randint(0, 97, (4, 41))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = loss_of(model, batch).item()
    for _ in range(150):
        loss = loss_of(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert first > 4.0 and loss.item() < 0.1


def test_gradient_checkpointing_gives_same_gradients_and_state_dict_keys():
    batch = torch.randint(0, 97, (2, 41))
    grads, keys = [], []
    for checkpointed in (False, True):
        model = tiny()
        if checkpointed:
            checkpoint_blocks(model)
        loss_of(model, batch).backward()
        grads.append({name.replace("_checkpoint_wrapped_module.", ""): p.grad for name, p in model.named_parameters()})
        keys.append(list(model.state_dict()))
    assert keys[0] == keys[1]
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad)


def test_kv_cache_generation_equals_full_recompute():
    model = tiny().eval()
    prompt = torch.randint(0, 97, (1, 7))
    cached = generate(model, prompt, SamplingSettings(temperature=0, max_new_tokens=12))
    ids = prompt
    for _ in range(12):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, ids[:, 7:])


def test_generation_stops_at_eos_and_fits_the_context():
    model = tiny().eval()
    long_prompt = torch.randint(0, 97, (1, 60))  # longer than n_seq=40: the tail is kept
    out = generate(model, long_prompt, SamplingSettings(temperature=1.0, max_new_tokens=100))
    assert 1 <= out.shape[1] <= 39
    first = generate(model, long_prompt[:, :5], SamplingSettings(temperature=0, max_new_tokens=5))
    stopped = generate(model, long_prompt[:, :5], SamplingSettings(temperature=0, max_new_tokens=5,
                                                                   eos_id=int(first[0, 0])))
    assert stopped.shape[1] == 1


def test_top_k_and_top_p_filtering():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, 2, 1.0)).tolist() == [[False, False, True, True, True]]
    probs = logits.softmax(-1)[0]  # 0.64, 0.24, 0.09, ...
    kept = ~torch.isinf(filter_logits(logits, 0, float(probs[0] + 0.01)))
    assert kept.tolist() == [[True, True, False, False, False]]
    assert (~torch.isinf(filter_logits(logits, 0, 0.1))).sum() == 1  # the top token always stays


def test_flops_per_token_counts_non_embedding_params():
    model = tiny()
    n = sum(p.numel() for p in model.parameters()) - model.embed_tokens.weight.numel()
    assert model.flops_per_token(40) == 6 * n + 12 * 2 * 64 * 40


def test_a_block_compiles_into_one_graph():
    """engine.blocks.compile_blocks compiles each block; a graph break inside one (as torch.compiler.disable caused)
    would split it and lose fusion. aot_eager traces forward and backward without needing a C++ compiler."""
    model = tiny("n_kv_heads=2")
    block, x = model.layers[0], torch.randn(2, 9, 64, requires_grad=True)
    rope = (model.rope_cos[:9], model.rope_sin[:9])
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    eager_out, compiled_out = block(x, rope), compiled(x, rope)
    torch.testing.assert_close(compiled_out, eager_out)
    eager_grad, = torch.autograd.grad(eager_out.square().sum(), x)
    compiled_grad, = torch.autograd.grad(compiled_out.square().sum(), x)
    torch.testing.assert_close(compiled_grad, eager_grad)


def test_repeat_kv_gives_query_head_h_the_kv_head_h_over_group():
    """The grouping flash_attention reads natively: query head h attends with kv head h // (heads // kv_heads)."""
    from phases.phase7.model import repeat_kv

    k, v = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4)
    k6, v6 = repeat_kv(k, v, 6)
    assert k6.shape == v6.shape == (2, 5, 6, 4)
    for h in range(6):
        assert torch.equal(k6[:, :, h], k[:, :, h // 2]) and torch.equal(v6[:, :, h], v[:, :, h // 2])
    assert repeat_kv(k, v, 3)[0] is k
