"""Train the small byte-level BPE that data-lite (and the tests) use when no tokenizer is given."""

from pathlib import Path
from typing import Iterable

from data.tokenizer import EOS


def train_bpe(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE `tokenizers.Tokenizer` whose only special token is EOS (id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok, folder: Path) -> Path:
    """Save as a transformers folder (tokenizer.json + config naming EOS); returns the tokenizer.json path."""
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS).save_pretrained(str(folder))
    return Path(folder) / "tokenizer.json"
