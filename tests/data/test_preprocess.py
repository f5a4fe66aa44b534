"""gdn2-preprocess on the real corpora: round trips, formats, determinism, resume, bad input."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_gdn2.data.preprocess import PreprocessConfig, main, preprocess
from megatron_gdn2.data.tokenizers import load_tokenizer
from tests.data.conftest import TOKENIZERS, WIKI, WIKITEXT, write_jsonl_gz

REPO = Path(__file__).resolve().parents[2]


def _run(inputs, prefix, tokenizer="gpt2", **kwargs):
    kwargs.setdefault("progress", False)
    return preprocess(PreprocessConfig(inputs=[str(i) for i in inputs], output_prefix=str(prefix),
                                       tokenizer=str(TOKENIZERS[tokenizer]), **kwargs))


def _documents(prefix) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    assert len(dataset.document_indices) == len(dataset) + 1  # one sequence per document
    return [dataset[i].tolist() for i in range(len(dataset))]


def _check_round_trip(prefix, texts, tokenizer, result, lossless=True):
    tok = load_tokenizer(TOKENIZERS[tokenizer])
    docs = _documents(prefix)
    expected = [t for t in texts if t]
    assert len(docs) == len(expected) == result.documents
    assert sum(map(len, docs)) == result.tokens
    ids_of_texts = tok.encode_batch(expected)
    assert result.tokens == sum(len(ids) + 1 for ids in ids_of_texts)
    for doc, text, ids in zip(docs, expected, ids_of_texts):
        assert doc[-1] == tok.eod and tok.eod not in doc[:-1]
        assert doc[:-1] == ids
        if lossless:
            assert tok.decode(doc[:-1]) == text


def _bytes(prefix) -> tuple[bytes, bytes]:
    return Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes()


@pytest.mark.parametrize("tokenizer", ["gpt2", "mistral_v1", "neox20b"])
def test_jsonl_gz_round_trip_with_chosen_field(tmp_path, tokenizer, wiki_records, book_records):
    # Two real books and 1,500 Wikipedia summaries, text under "body"; the corpus is NFC, on which
    # the NeoX tokenizer is lossless too.
    texts = [r["text"] for r in book_records[:2]] + [r["text"] for r in wiki_records[:1500]]
    records = [{"id": i, "body": t} for i, t in enumerate(texts)]
    source = write_jsonl_gz(tmp_path / "mixed.jsonl.gz", records)
    result = _run([source], tmp_path / "out", tokenizer, text_key="body", workers=2, docs_per_shard=400)
    assert (result.skipped_empty, result.shards_written, result.shards_reused) == (0, 4, 0)
    _check_round_trip(tmp_path / "out", texts, tokenizer, result)


def test_full_wikipedia_counts(data_dir, wiki_records):
    tok = load_tokenizer(TOKENIZERS["gpt2"])
    docs = _documents(data_dir["wiki"])
    assert len(docs) == len(wiki_records) == 10033
    encoded = tok.encode_batch([r["text"] for r in wiki_records])
    assert sum(map(len, docs)) == sum(len(ids) + 1 for ids in encoded)
    assert tok.decode(docs[-1][:-1]) == wiki_records[-1]["text"]


def test_parquet_input(tmp_path, wiki_records):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [r["text"] for r in wiki_records[:300]]
    texts.insert(150, "")  # an empty document is skipped and counted
    table = pa.table({"title": [str(i) for i in range(len(texts))], "content": texts})
    pq.write_table(table, tmp_path / "wiki.parquet", row_group_size=64)
    result = _run([tmp_path / "wiki.parquet"], tmp_path / "out", text_key="content", docs_per_shard=100)
    assert (result.documents, result.skipped_empty) == (300, 1)
    _check_round_trip(tmp_path / "out", texts, "gpt2", result)

    # Resuming inside a Parquet file skips whole row groups and rows correctly.
    shutil.rmtree(tmp_path / "out.shards", ignore_errors=True)
    again = _run([tmp_path / "wiki.parquet"], tmp_path / "again", text_key="content", docs_per_shard=100,
                 keep_shards=True)
    (tmp_path / "again.meta.json").unlink()
    for marker in sorted((tmp_path / "again.shards").glob("00000.0000[1-9].done.json")):
        marker.unlink()
    (tmp_path / "again.shards" / "00000.done.json").unlink()
    resumed = _run([tmp_path / "wiki.parquet"], tmp_path / "again", text_key="content", docs_per_shard=100)
    assert (again.shards_written, resumed.shards_reused, resumed.shards_written) == (4, 1, 3)
    assert _bytes(tmp_path / "again") == _bytes(tmp_path / "out")


def test_plain_text_lines_and_whole_file(tmp_path):
    lines = [line for line in WIKITEXT.read_text(encoding="utf-8").split("\n") if line]
    result = _run([WIKITEXT], tmp_path / "lines", text_mode="line", workers=2)
    _check_round_trip(tmp_path / "lines", lines, "gpt2", result)

    result = _run([WIKITEXT], tmp_path / "whole", text_mode="document")
    _check_round_trip(tmp_path / "whole", [WIKITEXT.read_text(encoding="utf-8")], "gpt2", result)


def test_directory_input_keeps_sorted_file_order(tmp_path, wiki_records):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    texts = [r["text"] for r in wiki_records[:30]]
    write_jsonl_gz(corpus / "b.jsonl.gz", [{"text": t} for t in texts[10:20]])
    write_jsonl_gz(corpus / "a.jsonl.gz", [{"text": t} for t in texts[:10]])
    (corpus / "sub" / "c.txt").write_text(texts[20], encoding="utf-8")
    (corpus / "README").write_text("not an input: no known suffix")
    result = _run([corpus], tmp_path / "out")
    assert [Path(f).name for f in result.files] == ["a.jsonl.gz", "b.jsonl.gz", "c.txt"]
    _check_round_trip(tmp_path / "out", texts[:21], "gpt2", result)


def test_output_does_not_depend_on_workers_or_shard_size(tmp_path, wiki_records):
    source = write_jsonl_gz(tmp_path / "wiki.jsonl.gz", wiki_records[:2000])
    one = _run([source], tmp_path / "one", workers=1, docs_per_shard=1_000_000)
    many = _run([source], tmp_path / "many", workers=2, docs_per_shard=300)
    assert (one.shards_written, many.shards_written) == (1, 7)
    assert _bytes(tmp_path / "one") == _bytes(tmp_path / "many")


def test_changed_input_is_tokenized_again(tmp_path, wiki_records):
    source = write_jsonl_gz(tmp_path / "wiki.jsonl.gz", wiki_records[:50])
    assert _run([source], tmp_path / "out").documents == 50
    assert _run([source], tmp_path / "out").up_to_date
    write_jsonl_gz(source, wiki_records[:51])
    changed = _run([source], tmp_path / "out")
    assert not changed.up_to_date and changed.documents == 51 and len(_documents(tmp_path / "out")) == 51


def test_resume_after_kill_gives_identical_output(tmp_path, data_dir):
    source = tmp_path / "wiki.jsonl.gz"
    shutil.copy(WIKI, source)
    prefix = tmp_path / "out"
    cmd = [sys.executable, "-m", "megatron_gdn2.data.preprocess", "--input", str(source),
           "--output-prefix", str(prefix), "--tokenizer", str(TOKENIZERS["gpt2"]), "--workers", "1",
           "--docs-per-shard", "200", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    shards = tmp_path / "out.shards"
    deadline = time.monotonic() + 120
    while len(list(shards.glob("*.*.done.json"))) < 3:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "preprocessing wrote no shard in 120 s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    committed = len(list(shards.glob("*.*.done.json")))
    assert 3 <= committed < 51 and not Path(f"{prefix}.meta.json").exists()

    resumed = _run([source], prefix, docs_per_shard=200)
    assert resumed.shards_reused >= committed and resumed.shards_reused + resumed.shards_written == 51
    assert _bytes(prefix) == _bytes(data_dir["wiki"])
    assert not shards.exists()

    rerun = _run([source], prefix, docs_per_shard=200)
    assert rerun.up_to_date and rerun.documents == 10033


def _error(tmp_path, inputs, match, **kwargs):
    with pytest.raises((ValueError, OSError), match=match):
        _run(inputs, tmp_path / "out", **kwargs)


def test_bad_input_fails_before_any_work(tmp_path, wiki_records):
    good = write_jsonl_gz(tmp_path / "good.jsonl.gz", [{"text": r["text"]} for r in wiki_records[:5]])
    _error(tmp_path, [good, tmp_path / "missing.jsonl"], "missing.jsonl' does not exist")
    _error(tmp_path, [str(tmp_path / "nothing*.jsonl")], "matches no file")
    (tmp_path / "data.csv").write_text("a,b\n")
    _error(tmp_path, [tmp_path / "data.csv"], "cannot tell the format of input .*data.csv")
    _error(tmp_path, [good], "good.jsonl.gz:1: record has no text field 'body'", text_key="body")
    write_jsonl_gz(tmp_path / "number.jsonl.gz", [{"text": 3}])
    _error(tmp_path, [tmp_path / "number.jsonl.gz"], "number.jsonl.gz:1: field 'text' is int")
    (tmp_path / "broken.jsonl.gz").write_bytes(b"not gzip at all")
    _error(tmp_path, [tmp_path / "broken.jsonl.gz"], "cannot read input .*broken.jsonl.gz")
    write_jsonl_gz(tmp_path / "empty.jsonl.gz", [{"text": ""}])
    _error(tmp_path, [tmp_path / "empty.jsonl.gz"], "hold no non-empty document")
    shutil.rmtree(tmp_path / "out.shards")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    _error(tmp_path, [tmp_path / "latin1.txt"], "latin1.txt:1: not UTF-8")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "t.parquet")
    _error(tmp_path, [tmp_path / "t.parquet"], "t.parquet' has no column 'text'")
    with pytest.raises(ValueError, match="tokenizer not found: .*nope"):
        preprocess(PreprocessConfig(inputs=[str(good)], output_prefix=str(tmp_path / "out"),
                                    tokenizer=str(tmp_path / "nope"), progress=False))
    assert not list(tmp_path.glob("out*")), "a failed check must not leave output behind"


def test_bad_record_in_the_middle_names_file_and_line(tmp_path, wiki_records):
    records = [{"text": r["text"]} for r in wiki_records[:40]]
    records[33] = {"title": "no text here"}
    source = write_jsonl_gz(tmp_path / "holes.jsonl.gz", records)
    _error(tmp_path, [source], "holes.jsonl.gz:34: record has no text field 'text'", docs_per_shard=10)
    assert not Path(f"{tmp_path / 'out'}.bin").exists()


def test_cli_reports_errors_and_writes_output(tmp_path, capsys, wiki_records):
    source = write_jsonl_gz(tmp_path / "w.jsonl.gz", [{"t": r["text"]} for r in wiki_records[:20]])
    base = ["--input", str(source), "--output-prefix", str(tmp_path / "out"), "--no-progress"]
    assert main(base + ["--tokenizer", str(tmp_path / "missing-tokenizer")]) == 1
    assert "missing-tokenizer" in capsys.readouterr().err
    assert main(base + ["--tokenizer", str(TOKENIZERS["gpt2"])]) == 1
    assert "w.jsonl.gz:1: record has no text field 'text'" in capsys.readouterr().err
    assert main(base + ["--tokenizer", str(TOKENIZERS["gpt2"]), "--text-key", "t", "--workers", "2"]) == 0
    assert len(_documents(tmp_path / "out")) == 20
    assert os.path.getsize(f"{tmp_path / 'out'}.bin") > 0
