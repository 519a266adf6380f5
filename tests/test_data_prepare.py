"""make data: a SlimPajama-like tree in, TinyLlama shards out, token for token; resumable; loud on bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data.bpe import save_tokenizer, train_bpe
from data.loader import open_data
from data.meta import read_meta, real_token_counts
from data.packed import open_shard
from data.prepare import parse_args, prepare
from data.sources import Issues, hf_documents
from data.stream import DataError
from data.tokenizer import load_tokenizer

WORDS = "the king and queen of a castle walk to sea with gold sword ring night day über café".split()


def sentence(rng, n=None):
    return " ".join(rng.choice(WORDS, n or int(rng.integers(3, 40))))


def write_jsonl_zst(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "\n".join(json.dumps(r) for r in records) + "\n"
    path.write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    return str(save_tokenizer(train_bpe([" ".join(WORDS)] * 50, 120), folder))


@pytest.fixture
def tree(tmp_path):
    """SlimPajama layout: <split>/chunkK/*.jsonl.zst with text and meta.redpajama_set_name."""
    rng = np.random.default_rng(0)
    docs = {}
    for split, files in (("train", ["chunk1/example_train_0", "chunk1/example_train_1", "chunk2/example_train_0"]),
                         ("validation", ["chunk1/example_val_0"])):
        for name in files:
            sets = rng.choice(["RedPajamaC4", "RedPajamaBook"], 30)
            records = [{"text": sentence(rng), "meta": {"redpajama_set_name": s}} for s in sets]
            write_jsonl_zst(tmp_path / "src" / split / f"{name}.jsonl.zst", records)
            docs[f"{split}/{name}"] = records
    return tmp_path / "src", docs


def run_prepare(source, tokenizer, dest, *flags):
    return prepare(parse_args(["--source", str(source), "--tokenizer", tokenizer, "--dest", str(dest), *flags]))


def read_split(dest, prefix):
    """Every real token of a split, in the loader's (sorted file name) order."""
    real = real_token_counts(read_meta(dest))
    paths = sorted(p for p in dest.glob("*.bin") if p.name.startswith(prefix))
    return np.concatenate([open_shard(p)[:real[p.name]] for p in paths]).tolist()


def expected_tokens(tokenizer_path, texts):
    tok = load_tokenizer(tokenizer_path)
    return [t for text in texts for t in tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]


def test_tree_becomes_the_exact_token_stream(tree, tokenizer_path, tmp_path):
    source, docs = tree
    dest = tmp_path / "out"
    meta = run_prepare(source, tokenizer_path, dest, "--workers", "2", "--chunk-size", "256")
    train_names = sorted(n for n in docs if n.startswith("train/"))
    texts = [r["text"] for n in train_names for r in docs[n]]
    assert read_split(dest, "train") == expected_tokens(tokenizer_path, texts)
    split = meta["splits"]["train"]
    assert split["documents"] == 90 and split["tokens"] == len(read_split(dest, "train"))
    by_set = {}
    for n in train_names:
        for r in docs[n]:
            by_set[r["meta"]["redpajama_set_name"]] = by_set.get(r["meta"]["redpajama_set_name"], 0) + \
                len(load_tokenizer(tokenizer_path)(r["text"], add_special_tokens=False)["input_ids"]) + 1
    assert split["sources"] == by_set
    assert sorted(split["inputs"]) == ["chunk1/example_train_0.jsonl.zst", "chunk1/example_train_1.jsonl.zst",
                                       "chunk2/example_train_0.jsonl.zst"]
    assert meta["dtype"] == "uint16" and (dest / "train_src_chunk1_example_train_0_jsonl_zst_0000000000.bin").exists()
    assert open_data(str(dest), "train", 16, 0, meta["vocab_size"]).num_tokens == split["tokens"]

    run_prepare(source, tokenizer_path, dest, "--split", "validation", "--workers", "1")
    val_texts = [r["text"] for r in docs["validation/chunk1/example_val_0"]]
    assert read_split(dest, "val") == expected_tokens(tokenizer_path, val_texts)
    meta = read_meta(dest)
    assert open_data(str(dest), "val", 16, 0, meta["vocab_size"]).num_tokens == meta["splits"]["validation"]["tokens"]


def test_rerun_skips_finished_inputs_and_redoes_interrupted_ones(tree, tokenizer_path, tmp_path, capsys):
    source, _ = tree
    dest = tmp_path / "out"
    run_prepare(source, tokenizer_path, dest, "--chunk-size", "64")
    before = read_split(dest, "train")
    stamps = {p.name: p.stat().st_mtime_ns for p in dest.glob("*.bin")}
    run_prepare(source, tokenizer_path, dest)
    assert "3 already done: nothing to do" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in dest.glob("*.bin")} == stamps

    # an interrupted run: one input not recorded, with a stale extra shard left behind
    meta = read_meta(dest)
    del meta["splits"]["train"]["inputs"]["chunk2/example_train_0.jsonl.zst"]
    (dest / "meta.json").write_text(json.dumps(meta))
    (dest / "train_src_chunk2_example_train_0_jsonl_zst_0000000099.bin").write_bytes(b"stale")
    run_prepare(source, tokenizer_path, dest, "--chunk-size", "64")
    assert "2 already done, 1 to tokenize" in capsys.readouterr().out
    assert not (dest / "train_src_chunk2_example_train_0_jsonl_zst_0000000099.bin").exists()
    assert read_split(dest, "train") == before


def test_percentage_takes_the_first_files(tree, tokenizer_path, tmp_path):
    meta = run_prepare(tree[0], tokenizer_path, tmp_path / "out", "--percentage", "0.5")
    assert list(meta["splits"]["train"]["inputs"]) == ["chunk1/example_train_0.jsonl.zst"]


def test_txt_parquet_and_plain_jsonl_inputs(tokenizer_path, tmp_path):
    src = tmp_path / "mixed"
    src.mkdir()
    (src / "a.txt").write_text("the king walks to the sea")
    (src / "b.jsonl").write_text(json.dumps({"text": "a queen with gold"}) + "\n")
    sets = [{"redpajama_set_name": "Books"}, {"redpajama_set_name": "Web"}]
    pq.write_table(pa.table({"text": ["night and day", "a sword"], "meta": sets}), src / "c.parquet")
    meta = run_prepare(src, tokenizer_path, tmp_path / "out")
    assert read_split(tmp_path / "out", "train") == expected_tokens(
        tokenizer_path, ["the king walks to the sea", "a queen with gold", "night and day", "a sword"])
    assert set(meta["splits"]["train"]["sources"]) == {"unnamed", "Books", "Web"}


@pytest.fixture
def bad_inputs(tmp_path):
    src = tmp_path / "bad"
    src.mkdir()
    records = [{"text": "the king"}, {"text": "   "}, {"title": "no text field"}, {"text": "a queen"}]
    lines = [json.dumps(r).encode() for r in records] + [b"{not json", b'{"text": "caf\xe9 night"}']
    (src / "a_good.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (src / "b_garbage.jsonl.zst").write_bytes(b"this is not zstd at all" * 10)
    whole = zstandard.ZstdCompressor().compress(b"\n".join(json.dumps({"text": "day"}).encode() for _ in range(500)))
    (src / "c_truncated.jsonl.zst").write_bytes(whole[: len(whole) // 2])
    (src / "d_broken.parquet").write_bytes(b"PAR1 garbage")
    pq.write_table(pa.table({"body": ["no text column"]}), src / "e_wrong_column.parquet")
    return src


def test_bad_inputs_are_listed_and_counted_never_dropped_silently(bad_inputs, tokenizer_path, tmp_path, capsys):
    meta = run_prepare(bad_inputs, tokenizer_path, tmp_path / "out", "--workers", "2")
    split = meta["splits"]["train"]
    assert set(split["failed"]) == {"b_garbage.jsonl.zst", "c_truncated.jsonl.zst", "d_broken.parquet",
                                    "e_wrong_column.parquet"}
    assert "truncated" in split["failed"]["c_truncated.jsonl.zst"]
    assert "no 'text' column" in split["failed"]["e_wrong_column.parquet"]
    assert split["inputs"]["a_good.jsonl"]["issues"] == {"empty": 1, "missing_text": 1, "bad_json": 1,
                                                         "invalid_utf8": 1}
    assert not list((tmp_path / "out").glob("train_bad_c_truncated*"))  # its partial shards are removed
    assert read_split(tmp_path / "out", "train") == expected_tokens(tokenizer_path,
                                                                    ["the king", "a queen", "caf\ufffd night"])
    out = capsys.readouterr().out
    assert out.count("FAILED") == 4 and "records without a 'text' field skipped (first: " in out


def test_strict_fails_on_the_first_bad_file(bad_inputs, tokenizer_path, tmp_path):
    with pytest.raises(DataError, match="not JSON|without a 'text' field|cannot read|truncated|no 'text' column"):
        run_prepare(bad_inputs, tokenizer_path, tmp_path / "out", "--strict", "--workers", "1")


def test_dest_not_writable_and_missing_source(tree, tokenizer_path, tmp_path, monkeypatch):
    with pytest.raises(DataError, match="--source is empty"):
        run_prepare("", tokenizer_path, tmp_path / "out")  # make data without SOURCE=
    (tmp_path / "a_file").write_text("")
    with pytest.raises(DataError, match="cannot write to DEST"):
        run_prepare(tree[0], tokenizer_path, tmp_path / "a_file" / "out")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="not a file or folder"):
        run_prepare(tmp_path / "nowhere", tokenizer_path, tmp_path / "out")


def test_a_missing_source_is_reported_before_the_empty_tokenizer_and_dest(tmp_path):
    """make data SOURCE=/nonexistent: the path is checked first, and never taken for a hub dataset's name."""
    with pytest.raises(DataError, match=f"^{tmp_path / 'nowhere'} is not a file or folder: check SOURCE"):
        run_prepare(tmp_path / "nowhere", "", "")
    result = subprocess.run(["make", "-n", "--no-print-directory", "data", f"SOURCE={tmp_path}", "WORKERS=2",
                             "PYTHON=python3"], cwd=os.path.dirname(os.path.dirname(__file__)),
                            capture_output=True, text=True)
    assert result.stdout == f'python3 -m data.prepare --source "{tmp_path}" --tokenizer "" --dest "" --workers 2\n'


def test_a_second_tokenizer_cannot_share_a_dest(tree, tokenizer_path, tmp_path):
    run_prepare(tree[0], tokenizer_path, tmp_path / "out")
    other = save_tokenizer(train_bpe(["completely different text here"] * 20, 280), tmp_path / "tok2")
    with pytest.raises(DataError, match="another tokenizer"):
        run_prepare(tree[0], str(other), tmp_path / "out")


def test_huggingface_dataset_source(tokenizer_path, tmp_path):
    """The datasets path, offline: a local folder of json files (and load_dataset('json', data_files=...))."""
    ds = tmp_path / "ds"
    ds.mkdir()
    texts = {"train": ["the king", "a queen walks"], "validation": ["night and day"]}
    for split, rows in texts.items():
        (ds / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    run_prepare(f"hf:{ds}", tokenizer_path, tmp_path / "out", "--split", "validation")
    assert read_split(tmp_path / "out", "val") == expected_tokens(tokenizer_path, texts["validation"])
    docs = list(hf_documents("json", None, "train", Issues(), data_files=str(ds / "train.jsonl")))
    assert docs == [("the king", "unnamed"), ("a queen walks", "unnamed")]


def test_cli_errors_are_one_line_without_traceback(tokenizer_path, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DEBUG": "0"}
    done = subprocess.run([sys.executable, "-m", "data.prepare", "--source", str(tmp_path / "nope"), "--tokenizer",
                           tokenizer_path, "--dest", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0 and done.stderr.startswith("error: ")
