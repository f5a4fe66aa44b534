"""A real corpus for the training tests: the first 2,000 English Wikipedia lead sections from
../shared/data, tokenized with the Mistral v1 SentencePiece model (32,000 tokens, the GDN-2
paper's vocabulary size) by gdn2-preprocess into a temporary directory (~240K tokens)."""
from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.shared_data import SHARED_DATA

WIKIPEDIA = SHARED_DATA / "corpora" / "wikipedia_vital_summaries" / "enwiki_vital4_summaries.jsonl.gz"
TOKENIZER = SHARED_DATA / "tokenizers" / "mistral_v1" / "tokenizer.model"
DOCUMENTS = 2000


@dataclass(frozen=True)
class Corpus:
    directory: Path  # holds only the preprocessed dataset
    prefix: str
    tokenizer: str
    cache_dir: str
    tokens: int


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Corpus:
    from megatron_gdn2.data.preprocess import PreprocessConfig, preprocess

    root = tmp_path_factory.mktemp("corpus")
    raw = root / "raw" / "wiki.jsonl"
    raw.parent.mkdir()
    with gzip.open(WIKIPEDIA, "rt", encoding="utf-8") as src, raw.open("w", encoding="utf-8") as out:
        for _, line in zip(range(DOCUMENTS), src):
            out.write(line)
    data_dir = root / "data"
    result = preprocess(PreprocessConfig(inputs=[str(raw)], output_prefix=str(data_dir / "wiki"),
                                         tokenizer=str(TOKENIZER), progress=False))
    assert result.documents == DOCUMENTS
    return Corpus(directory=data_dir, prefix=str(data_dir / "wiki"), tokenizer=str(TOKENIZER),
                  cache_dir=str(root / "index_cache"), tokens=result.tokens)
