"""A byte-level BPE tokenizer trained with HF `tokenizers` on a corpus, then cached.

It is trained on the *whole* corpus (train and validation), as production
tokenizers are trained on data other than the model's. Sixteen reserved special
tokens are added that no text ever produces, like Llama 3's
``<|reserved_special_token_*|>``: they are the known-unused reference tokens that
the under-trained token detector (2405.05417) starts from.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from paperzoo.core import store
from paperzoo.core.corpus import Corpus

EOS = "<|endoftext|>"
RESERVED = tuple(f"<|reserved_{i}|>" for i in range(16))


def train_tokenizer(corpus: Corpus, vocab_size: int) -> PreTrainedTokenizerFast:
    key = store.stable_hash(["bpe-v1", corpus.fingerprint, vocab_size])
    path = store.home() / "tokenizers" / key

    def build(tmp: Path) -> None:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS, *RESERVED],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(corpus.all_documents, trainer=trainer)
        wrap(tok).save_pretrained(tmp)

    store.cached_dir(path, build)
    return PreTrainedTokenizerFast.from_pretrained(path)


def wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS,
        additional_special_tokens=list(RESERVED),
    )
