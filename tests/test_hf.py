"""Phase hf on CPU with a tiny Qwen3 saved here by save_pretrained (model and tokenizer, no hub), loaded by the
real code path: our loss against the stock transformers forward, our kernels inside the model (in Triton's
interpreter), training, exact resume, export round trip, chat, and the one-line errors."""

import argparse
import importlib.util
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before kernels is imported (see tests/test_kernels.py)

import pytest  # noqa: E402

from engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint  # noqa: E402
from engine.config import ConfigError  # noqa: E402
from engine.sampling import SamplingSettings  # noqa: E402
from engine.train import Trainer  # noqa: E402
from phases import config_from_dict, load_config  # noqa: E402
from phases.hf import build_model, generate, next_token_loss  # noqa: E402
from tests.resume_check import assert_resume_is_exact, logged  # noqa: E402
from tests.tiny_tokenizer import tiny_bpe  # noqa: E402

ROOT = __file__.rsplit("/tests/", 1)[0]
VOCAB = 300
RUN = ["phase=hf", "n_seq=16", "batch_size=2", "gradient_accumulation_steps=2", "warmup_steps=2", "log_every=1",
       "eval_every=3", "eval_batches=2", "save_every=3", "learning_rate=1e-2"]


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory) -> str:
    """A 2-layer Qwen3 (GQA 4:2, head_dim 16, tied embeddings, as Qwen3-0.6B) with a byte-level BPE tokenizer."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen3Config

    folder = tmp_path_factory.mktemp("tiny_qwen3")
    PreTrainedTokenizerFast(tokenizer_object=tiny_bpe(VOCAB), eos_token="<|endoftext|>").save_pretrained(folder)
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, intermediate_size=128, max_position_embeddings=128,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return str(folder)


def stock(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def ours(folder, *extra):
    return build_model(load_config(None, ["phase=hf", f"model_name={folder}", *extra]))


def loss_and_grads(model, loss_fn):
    model.zero_grad()
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same_loss_and_grads(model, cfg_extra, reference, batch):
    cfg = load_config(None, ["phase=hf", "model_name=x", *cfg_extra])
    loss, grads = loss_and_grads(model, lambda: next_token_loss(model, batch, cfg))
    ref_loss, ref_grads = loss_and_grads(reference, lambda: reference(input_ids=batch, labels=batch).loss)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("fused", [True, False])
def test_our_loss_is_the_stock_transformers_loss_and_gradient(tiny_qwen3, fused):
    model = ours(tiny_qwen3, f"fused_cross_entropy={fused}")
    assert model.describe().endswith("cross-entropy fused" if fused else "cross-entropy on the full logits")
    assert list(model.state_dict()) == list(stock(tiny_qwen3).state_dict())  # transformers' own keys
    batch = torch.randint(0, VOCAB, (2, 17))
    assert_same_loss_and_grads(model, [f"fused_cross_entropy={fused}"], stock(tiny_qwen3), batch)


needs_interpreter = pytest.mark.skipif(
    torch.cuda.is_available() or importlib.util.find_spec("triton") is None
    or not importlib.import_module("kernels.attention").INTERPRETED,
    reason="runs the Triton kernels in the interpreter on CPU (needs triton, and kernels imported after "
           "TRITON_INTERPRET=1); on a GPU the kernels are tested by test_kernels.py")


@needs_interpreter
def test_our_kernels_inside_the_model_match_stock_transformers(tiny_qwen3, monkeypatch):
    import kernels.attention
    import kernels.norm
    import phases.hf.config

    calls = {"attention": 0, "norm": 0}

    def spy(module, name, key):
        real = getattr(module, name)

        def counted(*args, **kwargs):
            calls[key] += 1
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)

    spy(kernels.attention, "flash_attention", "attention")
    spy(kernels.norm, "rms_norm", "norm")
    monkeypatch.setattr(phases.hf.config, "triton_available", lambda *a: True)  # as on CUDA
    model = ours(tiny_qwen3)
    assert "attention triton | rms_norm triton" in model.describe()
    assert type(model.layers[0].self_attn.k_norm).__name__ == "KernelRMSNorm"  # Qwen3's head-dim norms too
    calls.update(attention=0, norm=0)  # building probed the model once
    assert_same_loss_and_grads(model, [], stock(tiny_qwen3), torch.randint(0, VOCAB, (1, 9)))
    # per layer: attention once; input, post-attention, q and k norms; plus the final norm
    assert calls == {"attention": 2, "norm": 2 * 4 + 1}

    calls.update(attention=0)
    with torch.no_grad():  # decoding against a cache has a query shorter than the keys: transformers' SDPA
        generate(model, torch.tensor([[1, 2, 3]]), SamplingSettings(temperature=0, max_new_tokens=2))
    assert calls["attention"] == 2  # the prompt, in each layer; each decoding step went to SDPA


@pytest.mark.gpu
def test_on_cuda_our_kernels_in_compiled_layers_train_like_stock_transformers_in_bf16(tiny_qwen3):
    from engine.blocks import apply_to_blocks

    cfg = load_config(None, ["phase=hf", f"model_name={tiny_qwen3}", "use_compile=true"])
    model = build_model(cfg).cuda()
    assert "attention triton | rms_norm triton | cross-entropy fused" in model.describe()
    apply_to_blocks(model, cfg, torch.device("cuda"))
    reference = stock(tiny_qwen3).cuda()
    batch = torch.randint(0, VOCAB, (4, 129), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = next_token_loss(model.train(), batch, cfg)
        expected = reference.train()(input_ids=batch, labels=batch).loss
    loss.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=2e-2)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_only_rms_norms_that_compute_llamas_are_swapped():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    from phases.hf.extensions import computes_llama_rms_norm

    assert computes_llama_rms_norm(LlamaRMSNorm(16)) and computes_llama_rms_norm(Qwen3RMSNorm(16))
    assert not computes_llama_rms_norm(GemmaRMSNorm(16))  # x * (1 + weight)
    assert not computes_llama_rms_norm(Olmo2RMSNorm(16))  # scales before casting back: other rounding


def test_training_lowers_the_loss_and_resume_is_exact(tiny_qwen3, markov_data, tmp_path):
    def run(name, *extra):
        return Trainer(load_config(None, RUN + [f"model_name={tiny_qwen3}", f"data={markov_data}", "max_steps=6",
                                                f"out_dir={tmp_path / name}", *extra]))

    a, _ = assert_resume_is_exact(run, tmp_path, "hf")
    straight = logged(tmp_path / "straight")
    assert straight[-1][2] < straight[2][2] and straight[-1][2] < straight[0][1] - 1.0  # from ln 300 = 5.7
    assert a["tokenizer"] == tiny_qwen3 and a["config"]["vocab_size"] == VOCAB  # both followed the model


@pytest.fixture(scope="module")
def trained_run(tiny_qwen3, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("hf_run") / "run"
    Trainer(load_config(None, RUN + [f"model_name={tiny_qwen3}", "data=dummy", "max_steps=2", "eval_every=2",
                                     f"out_dir={out}"])).fit()
    return str(out)


def test_export_gives_a_folder_from_pretrained_loads_with_equal_logits(trained_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.export import main as export  # what `make export CHECKPOINT=<run folder> OUT=...` runs

    export([trained_run, str(tmp_path / "exported")])
    state = load_checkpoint(f"{trained_run}/hf_best.pt")  # the run folder's checkpoint that export picked
    model = build_model(config_from_dict(state["config"]))
    model.load_state_dict(state["model"])
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    ids = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        assert torch.equal(model.eval()(ids), exported(input_ids=ids).logits)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "exported")
    assert tokenizer.encode("to be or not") == AutoTokenizer.from_pretrained(state["tokenizer"]).encode("to be or not")

    save_checkpoint(tmp_path / "mdm.pt", {"phase": "mdm", "config": {"phase": "mdm"}, "model": {}})
    with pytest.raises(CheckpointError,
                       match=r"'mdm' checkpoint and that phase has no exporter \(phases/mdm/export.py"):
        export([str(tmp_path / "mdm.pt"), str(tmp_path / "out")])


def test_chat_finds_the_models_tokenizer_and_decodes_as_transformers_does(trained_run):
    from engine.chat import Chat
    from engine.checkpoint import resolve_checkpoint

    chat = Chat(resolve_checkpoint(trained_run), "cpu")
    greedy = SamplingSettings(temperature=0, max_new_tokens=6)
    assert isinstance(chat.complete("to be", greedy), str)
    prompt = torch.tensor([chat.tokenizer.encode("to be", add_special_tokens=False)])
    ours_ids = generate(chat.model, prompt, greedy)
    theirs = chat.model.hf.generate(prompt, do_sample=False, max_new_tokens=6, eos_token_id=None)
    assert torch.equal(ours_ids, theirs[:, prompt.shape[1]:])


def test_model_errors_are_one_line_and_say_what_to_do(tiny_qwen3, tmp_path, monkeypatch):
    from transformers import BertConfig

    with pytest.raises(ConfigError, match=f"model folder {tmp_path}/missing not found"):
        ours(tmp_path / "missing")
    BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=64).save_pretrained(tmp_path / "bert")
    with pytest.raises(ConfigError, match="is a 'bert' model .*not a causal LM"):
        ours(tmp_path / "bert")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="not in the Hugging Face cache.* `hf download nobody-here/no-model "
                                          "--local-dir /models/no-model`"):
        ours("nobody-here/no-model")
    with pytest.raises(ConfigError, match=f"vocab_size=512, but the pretrained weights of .* have {VOCAB}"):
        ours(tiny_qwen3, "vocab_size=512")
    assert ours(tiny_qwen3, "vocab_size=512", "init=scratch").lm_head.weight.shape[0] == 512

    result = subprocess.run(["make", "--no-print-directory", f"PYTHON={sys.executable}", "train",
                             "CONFIG=configs/hf_qwen3_0.6b.yaml", f"ARGS=model_name={tmp_path}/Qwen3-0.6B"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[0] == (f"error: model folder {tmp_path}/Qwen3-0.6B not found: give an existing"
                                             " folder with config.json, or a hub name such as Qwen/Qwen3-0.6B")


def test_bench_hf_lever_rows_change_only_their_own_switches_and_end_at_the_recipe():
    from bench import hf

    args = argparse.Namespace(model="m", batch_size=16, overrides=[])
    switches, previous = [], None
    for name, lever in hf.LEVERS:
        switches += lever
        cfg = load_config(hf.CONFIG, hf.bench_overrides(args) + switches).to_dict()
        if previous is not None:
            assert {key for key in cfg if cfg[key] != previous[key]} == {s.split("=")[0] for s in lever}, name
        previous = cfg
    assert cfg == load_config(hf.CONFIG, hf.bench_overrides(args)).to_dict()  # the last row is the recipe


def test_bench_hf_runs_its_rows_on_a_cpu_stand_in(tiny_qwen3, monkeypatch, capsys):
    """The GPU benchmark's code, timed on CPU with device=cpu: GPU time is scarce, bugs should not spend it.
    Nothing pretends CUDA is there, so torch's own code (e.g. an optimizer step) takes its CPU path whatever
    torch's version."""
    import phases.hf.config
    from bench import hf

    monkeypatch.setattr(torch, "compile", lambda model: model)  # inductor on CPU would take minutes
    monkeypatch.setattr(phases.hf.config, "triton_available", lambda *a: False)  # not the interpreter's pace
    recorded = []
    monkeypatch.setattr(hf, "record", lambda *entry: recorded.append(entry))
    assert hf.main(["--model", tiny_qwen3, "--batch-size", "2", "--warmup", "1", "--steps", "1", "--memory-mode",
                    "device=cpu", "n_seq=16"]) == 0
    out = capsys.readouterr().out
    assert [row.split("|")[1].strip() for row in recorded[0][2].splitlines()[2:]] == [
        "plain loop, eager", "plain loop + torch.compile", "ours (phase hf)", "ours, memory mode"]
    assert "ours (phase hf) / plain loop + torch.compile: " in out and "peak memory" not in out  # no GPU memory
    assert "micro-batch 2 x 16 tokens" in recorded[0][3]


def test_a_finished_sweep_point_is_read_back_not_trained_again(tiny_qwen3, tmp_path, monkeypatch):
    """The saved config holds the vocab_size and tokenizer the run took from the model; the sweep compares
    against those, not against the unset keys of the recipe."""
    import engine.sweep

    config = tmp_path / "hf.yaml"
    config.write_text(f"phase: hf\nmodel_name: {tiny_qwen3}\ndata: dummy\nn_seq: 16\nbatch_size: 2\nmax_steps: 2\n"
                      "eval_every: 2\neval_batches: 1\nwarmup_steps: 1\n")
    first = engine.sweep.sweep(str(config), ["learning_rate=1e-3"], str(tmp_path / "sweep"))
    monkeypatch.setattr(engine.sweep, "Trainer", None)  # training again would fail
    assert engine.sweep.sweep(str(config), ["learning_rate=1e-3"], str(tmp_path / "sweep")) == first
