"""A byte-level BPE trained in a blink on one sentence: a real tokenizer for chat and hf tests, no hub."""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers


def tiny_bpe(vocab_size: int = 300) -> Tokenizer:
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["to be or not to be, that is the question"] * 20,
                            trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return bpe
