"""One way to get a tokenizer everywhere (prepare, on-the-fly data, chat): a tokenizer.json file, a saved
folder, or a transformers hub name (offline only when cached)."""

import hashlib
from pathlib import Path

from data.hub import hub_reachable
from data.stream import DataError

EOS = "<|endoftext|>"  # the EOS of tokenizers trained here (data-lite)


def load_tokenizer(ref: str):
    """A transformers fast tokenizer with eos_token set; DataError with the fix when it cannot be loaded."""
    if not ref:
        raise DataError("no tokenizer given: pass a tokenizer.json path, a folder or a hub name (tokenizer=...)")
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(ref)
    try:
        if path.is_file():
            tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
        elif path.is_dir():
            tok = AutoTokenizer.from_pretrained(str(path))
        else:
            tok = from_hub(ref)
    except DataError:
        raise
    except Exception as e:  # transformers raises OSError, ValueError, JSON errors... all mean "cannot load"
        raise DataError(f"cannot load tokenizer {ref!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}): "
                        "give a valid tokenizer.json, a saved tokenizer folder or a hub name") from None
    if tok.eos_token is None and EOS in tok.get_vocab():
        tok.eos_token = EOS
    return tok


def tokenizer_sha1(tokenizer) -> str:
    """Identifies a tokenizer by content, whatever path or name it was loaded from."""
    return hashlib.sha1(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def from_hub(name: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except OSError:
        if not hub_reachable():
            raise DataError(f"tokenizer {name!r} is not a file, folder or cached hub name and the hub is "
                            "unreachable: give a tokenizer.json path or a saved folder") from None
        return AutoTokenizer.from_pretrained(name)
