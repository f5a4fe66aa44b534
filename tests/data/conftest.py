"""Real corpora and tokenizers from ../shared/data (next to the repository root) for data tests."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from tests.shared_data import SHARED_DATA

WIKI = SHARED_DATA / "corpora" / "wikipedia_vital_summaries" / "enwiki_vital4_summaries.jsonl.gz"
GUTENBERG_VAL = SHARED_DATA / "corpora" / "gutenberg" / "val_00.jsonl.gz"
WIKITEXT = SHARED_DATA / "eval" / "wikitext2_raw_test.lf.txt"
TOKENIZERS = {
    "gpt2": SHARED_DATA / "tokenizers" / "gpt2",
    "neox20b": SHARED_DATA / "tokenizers" / "neox20b" / "tokenizer.json",
    "mistral_v1": SHARED_DATA / "tokenizers" / "mistral_v1" / "tokenizer.model",
}


def read_jsonl_gz(path: Path, limit: int | None = None) -> list[dict]:
    records = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            records.append(json.loads(line))
            if limit is not None and len(records) == limit:
                break
    return records


def write_jsonl_gz(path: Path, records: list[dict]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


@pytest.fixture(scope="session", autouse=True)
def _shared_data_present():
    if not WIKI.is_file():
        pytest.fail(f"the data tests need the real corpora in {SHARED_DATA} (see its README)")


@pytest.fixture(scope="session")
def wiki_records() -> list[dict]:
    return read_jsonl_gz(WIKI)


@pytest.fixture(scope="session")
def book_records() -> list[dict]:
    return read_jsonl_gz(GUTENBERG_VAL)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, wiki_records, book_records) -> dict[str, str]:
    """Indexed datasets (GPT-2 tokenizer) of the Wikipedia summaries and of three Gutenberg books."""
    from megatron_gdn2.data.preprocess import PreprocessConfig, preprocess

    root = tmp_path_factory.mktemp("indexed")
    books = write_jsonl_gz(root / "books.jsonl.gz", book_records[:3])
    prefixes = {"wiki": str(root / "wiki"), "books": str(root / "books")}
    for name, source in (("wiki", WIKI), ("books", books)):
        preprocess(PreprocessConfig(inputs=[str(source)], output_prefix=prefixes[name],
                                    tokenizer=str(TOKENIZERS["gpt2"]), workers=2, progress=False))
    return prefixes
