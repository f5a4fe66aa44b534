"""Tokenize raw text into a Megatron-Core indexed dataset (``PREFIX.bin`` / ``PREFIX.idx``).

Command line (console script ``gdn2-preprocess``)::

    gdn2-preprocess --input corpus/*.jsonl.gz --text-key text \\
        --tokenizer /path/to/tokenizer.json --output-prefix data/corpus --workers 8

Python: ``preprocess(PreprocessConfig(...)) -> PreprocessResult``.

Inputs are files, directories (searched recursively for the formats below) or glob patterns, in
the order given:

- JSON lines (``.jsonl``, ``.json``, ``.ndjson``, optionally ``.gz``): one document per line, text in
  ``--text-key`` (default ``text``);
- Parquet (``.parquet``): one document per row, text in the ``--text-key`` column;
- plain text (``.txt``, ``.text``, ``.md``, optionally ``.gz``): the whole file is one document
  (``--text-mode document``) or every non-empty line is one (``--text-mode line``).

Every document becomes one sequence followed by the tokenizer's end-of-document token (unless
``--no-eod``); documents with empty text are skipped and counted. Token ids are stored as uint16
when the vocabulary fits, else int32 (Megatron's ``DType.optimal_dtype``).

Determinism: workers tokenize chunks of documents, and results are written in input order, so
the output bytes do not depend on ``--workers``.

Resumability: the input is cut into shards of ``--docs-per-shard`` records of one input file.
Each shard is written to ``PREFIX.shards/`` under a temporary name, renamed when complete, then
committed by a ``.done.json`` marker that records the source file (path, size, mtime) and the
settings (tokenizer file hashes, text key, ...). A rerun reuses every committed shard whose marker
matches and continues a half-done file from its first missing shard; the shards are merged into
``PREFIX.bin``/``PREFIX.idx`` at the end (both renamed into place), and ``PREFIX.meta.json`` (the
commit marker of the whole output, with document and token counts) is written last. A rerun
against an up-to-date output does nothing. Shards are deleted after the merge unless
``--keep-shards``.

Bad input (a missing or unreadable file, an unknown format, a missing text field in the first
record, an unknown tokenizer, an unwritable output directory) is reported before any tokenizing
starts; a record lacking the text field later in a file stops the run with its file and line.
"""
from __future__ import annotations

import argparse
import collections
import gc
import glob
import gzip
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from megatron_gdn2.data.tokenizers import Tokenizer, load_tokenizer

__all__ = ["PreprocessConfig", "PreprocessResult", "main", "preprocess"]

logger = logging.getLogger(__name__)

_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_TEXT_SUFFIXES = (".txt", ".text", ".md")
FORMATS = ("jsonl", "parquet", "text")

# A tokenizing task holds at most this many documents / characters: large enough to amortise the
# inter-process hop, small enough that a few in flight per worker stay cheap in memory.
_CHUNK_DOCS = 256
_CHUNK_CHARS = 1 << 20


@dataclass
class PreprocessConfig:
    inputs: Sequence[str]
    """Input files, directories or glob patterns, in output order."""
    output_prefix: str
    """Output path prefix: writes PREFIX.bin, PREFIX.idx and PREFIX.meta.json."""
    tokenizer: str
    """Tokenizer spec for :func:`megatron_gdn2.data.tokenizers.load_tokenizer`."""
    text_key: str = "text"
    """JSON field / Parquet column holding the document text."""
    input_format: str | None = None
    """One of FORMATS for every input; None infers it from each file name."""
    text_mode: str = "document"
    """Plain text only: 'document' (a file is one document) or 'line' (a non-empty line is one)."""
    eod_token: str | None = None
    """Override of the tokenizer's end-of-document token."""
    append_eod: bool = True
    workers: int = 1
    docs_per_shard: int = 100_000
    keep_shards: bool = False
    progress: bool = True


@dataclass
class PreprocessResult:
    output_prefix: str
    documents: int
    tokens: int
    """Tokens written, end-of-document tokens included."""
    skipped_empty: int
    files: list[str] = field(default_factory=list)
    shards_reused: int = 0
    shards_written: int = 0
    up_to_date: bool = False
    """True when the output already matched the inputs and nothing was done."""


# ---------------------------------------------------------------------------------------------
# inputs


def _format_of(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last in _JSONL_SUFFIXES:
        return "jsonl"
    if last == ".parquet":
        return "parquet"
    if last in _TEXT_SUFFIXES:
        return "text"
    return None


def resolve_inputs(inputs: Sequence[str], input_format: str | None) -> list[tuple[Path, str]]:
    """Expand files, directories and globs into ``(file, format)`` pairs, checking each exists."""
    if input_format is not None and input_format not in FORMATS:
        raise ValueError(f"unknown input format {input_format!r}: choose one of {FORMATS}")
    if not inputs:
        raise ValueError("no input given")
    resolved: list[tuple[Path, str]] = []
    for spec in inputs:
        path = Path(spec).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _format_of(p))
            if not found:
                raise ValueError(f"input directory '{path}' holds no .jsonl/.parquet/.txt files")
            candidates = found
        elif path.exists():
            candidates = [path]
        elif glob.has_magic(spec):
            candidates = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True))
            candidates = [p for p in candidates if p.is_file()]
            if not candidates:
                raise FileNotFoundError(f"input pattern '{spec}' matches no file")
        else:
            raise FileNotFoundError(f"input '{path}' does not exist")
        for file in candidates:
            fmt = input_format or _format_of(file)
            if fmt is None:
                raise ValueError(
                    f"cannot tell the format of input '{file}' from its name: use one of "
                    f"{_JSONL_SUFFIXES + ('.parquet',) + _TEXT_SUFFIXES} (optionally .gz) or pass "
                    "--format"
                )
            if not os.access(file, os.R_OK):
                raise PermissionError(f"input '{file}' is not readable")
            resolved.append((file.resolve(), fmt))
    return resolved


def _open_binary(path: Path):
    """Return (decompressed stream, raw file) so that progress can follow raw.tell()."""
    raw = open(path, "rb")
    if path.suffix.lower() == ".gz":
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    return raw, raw


def _json_text(line: bytes, path: Path, lineno: int, text_key: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{lineno}: not valid JSON ({err})") from err
    if not isinstance(record, dict) or text_key not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{path}:{lineno}: record has no text field '{text_key}' (it has {keys})")
    text = record[text_key]
    if not isinstance(text, str):
        raise ValueError(f"{path}:{lineno}: field '{text_key}' is {type(text).__name__}, not a string")
    return text


def _iter_jsonl(path: Path, text_key: str, skip: int) -> Iterator[tuple[str, int]]:
    stream, raw = _open_binary(path)
    with raw, stream:
        record = 0
        for lineno, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            record += 1
            if record <= skip:
                continue
            yield _json_text(line, path, lineno, text_key), raw.tell()


def _iter_parquet(path: Path, text_key: str, skip: int) -> Iterator[tuple[str, int]]:
    import pyarrow.parquet as pq

    size = path.stat().st_size
    with pq.ParquetFile(path) as parquet:
        total = max(parquet.metadata.num_rows, 1)
        row = 0
        for batch in parquet.iter_batches(batch_size=1024, columns=[text_key]):
            column = batch.column(0)
            if row + len(column) <= skip:
                row += len(column)
                continue
            for text in column.to_pylist():
                row += 1
                if row <= skip:
                    continue
                if not isinstance(text, str):
                    raise ValueError(f"{path}: row {row} of column '{text_key}' is {text!r}, not a string")
                yield text, size * row // total


def _iter_text(path: Path, text_mode: str, skip: int) -> Iterator[tuple[str, int]]:
    stream, raw = _open_binary(path)
    with raw, stream:
        if text_mode == "document":
            if skip == 0:
                yield _decode_utf8(stream.read(), path, 1), path.stat().st_size
            return
        record = 0
        for lineno, line in enumerate(stream, start=1):
            line = line.rstrip(b"\n").rstrip(b"\r")
            if not line:
                continue
            record += 1
            if record > skip:
                yield _decode_utf8(line, path, lineno), raw.tell()


def _decode_utf8(data: bytes, path: Path, lineno: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}:{lineno}: not UTF-8 text ({err})") from err


def iter_documents(
    path: Path, fmt: str, *, text_key: str = "text", text_mode: str = "document", skip: int = 0
) -> Iterator[tuple[str, int]]:
    """Yield ``(text, bytes of the file read so far)`` per record after the first ``skip``."""
    if fmt == "jsonl":
        return _iter_jsonl(path, text_key, skip)
    if fmt == "parquet":
        return _iter_parquet(path, text_key, skip)
    return _iter_text(path, text_mode, skip)


def _check_input(path: Path, fmt: str, text_key: str, text_mode: str) -> None:
    """Read the first record, so a wrong text key or format fails before any long work."""
    try:
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema = pq.read_schema(path)
            if text_key not in schema.names:
                raise ValueError(f"input '{path}' has no column '{text_key}' (it has {schema.names})")
            column_type = schema.field(text_key).type
            if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
                raise ValueError(f"column '{text_key}' of input '{path}' is {column_type}, not a string")
            return
        if fmt == "text":
            stream, raw = _open_binary(path)
            with raw, stream:
                head = stream.read(1 << 16)
            # A multi-byte character may be cut at the end of the probe.
            _decode_utf8(head[: max(len(head) - 3, 0)] if len(head) == 1 << 16 else head, path, 1)
            return
        next(iter_documents(path, fmt, text_key=text_key), None)
    except ValueError:
        raise
    except Exception as err:  # gzip, pyarrow and the OS each raise their own error types
        raise ValueError(f"cannot read input '{path}' as {fmt}: {err}") from err


# ---------------------------------------------------------------------------------------------
# tokenizing in worker processes

_WORKER_TOKENIZER: Tokenizer | None = None
_WORKER_DTYPE: type | None = None
_WORKER_EOD: bool = True


def _set_tokenizer_state(tokenizer: Tokenizer, dtype: type, append_eod: bool) -> None:
    global _WORKER_TOKENIZER, _WORKER_DTYPE, _WORKER_EOD
    _WORKER_TOKENIZER, _WORKER_DTYPE, _WORKER_EOD = tokenizer, dtype, append_eod


def _init_worker(tokenizer: str, eod_token: str | None, dtype: type, append_eod: bool) -> None:
    # One Rust thread pool per worker process would oversubscribe the cores the pool already uses.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _set_tokenizer_state(load_tokenizer(tokenizer, eod_token), dtype, append_eod)


def _tokenize_chunk(texts: list[str]) -> list[np.ndarray | None]:
    tok = _WORKER_TOKENIZER
    nonempty = [t for t in texts if t]
    encoded = iter(tok.encode_batch(nonempty)) if nonempty else iter(())
    out: list[np.ndarray | None] = []
    for text in texts:
        if not text:
            out.append(None)
            continue
        ids = next(encoded)
        if _WORKER_EOD:
            ids = [*ids, tok.eod]
        out.append(np.asarray(ids, dtype=_WORKER_DTYPE))
    return out


def _chunks(docs: Iterable[tuple[str, int]]) -> Iterator[tuple[list[str], int]]:
    texts: list[str] = []
    chars = 0
    position = 0
    for text, position in docs:
        texts.append(text)
        chars += len(text)
        if len(texts) >= _CHUNK_DOCS or chars >= _CHUNK_CHARS:
            yield texts, position
            texts, chars = [], 0
    if texts:
        yield texts, position


def _ordered_map(pool, fn: Callable, items: Iterable, payload=lambda item: item, max_in_flight: int = 4):
    """Like ``pool.imap`` (results in input order) but reads ``items`` lazily: ``imap`` would pull
    the whole input into its task queue at once."""
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append((item, pool.apply_async(fn, (payload(item),))))
        if len(pending) >= max_in_flight:
            head, result = pending.popleft()
            yield head, result.get()
    while pending:
        head, result = pending.popleft()
        yield head, result.get()


# ---------------------------------------------------------------------------------------------
# shards and markers


def _sha256(paths: Iterable[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _publish(tmp: Path, final: Path) -> None:
    """Rename TMP.bin/.idx to FINAL.bin/.idx once their bytes are on disk, so that the marker
    written after this never vouches for data a crash could still lose."""
    for ext in (".bin", ".idx"):
        with open(str(tmp) + ext, "rb") as f:
            os.fsync(f.fileno())
    for ext in (".bin", ".idx"):
        os.replace(str(tmp) + ext, str(final) + ext)


def _read_json(path: Path) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _source_id(path: Path) -> dict:
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


class _ShardWriter:
    """Writes the shards of one input file, committing each when it holds docs_per_shard records."""

    def __init__(self, shard_dir: Path, file_index: int, first_part: int, stamp: dict, dtype, limit: int):
        self.shard_dir, self.file_index, self.stamp = shard_dir, file_index, stamp
        self.dtype, self.limit = dtype, limit
        self.part = first_part
        self.builder = None
        self.records = self.documents = self.tokens = self.skipped = 0
        self.written = 0

    def add(self, ids: np.ndarray | None) -> None:
        if self.builder is None:
            from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

            self.builder = IndexedDatasetBuilder(str(self._tmp()) + ".bin", dtype=self.dtype)
        self.records += 1
        if ids is None:
            self.skipped += 1
        else:
            self.builder.add_document(ids, [len(ids)])
            self.documents += 1
            self.tokens += len(ids)
        if self.records == self.limit:
            self.commit()

    def commit(self) -> None:
        if self.builder is None:
            return
        tmp, final = self._tmp(), shard_prefix(self.shard_dir, self.file_index, self.part)
        self.builder.finalize(str(tmp) + ".idx")
        _publish(tmp, final)
        _write_json_atomic(
            _marker(final),
            {**self.stamp, "records": self.records, "documents": self.documents,
             "tokens": self.tokens, "skipped_empty": self.skipped},
        )
        self.builder = None
        self.records = self.documents = self.tokens = self.skipped = 0
        self.part += 1
        self.written += 1

    def _tmp(self) -> Path:
        return Path(str(shard_prefix(self.shard_dir, self.file_index, self.part)) + ".tmp")


def shard_prefix(shard_dir: Path, file_index: int, part: int) -> Path:
    return shard_dir / f"{file_index:05d}.{part:05d}"


def _marker(prefix: Path) -> Path:
    return Path(str(prefix) + ".done.json")


def _file_marker(shard_dir: Path, file_index: int) -> Path:
    return shard_dir / f"{file_index:05d}.done.json"


def _committed_parts(shard_dir: Path, file_index: int, stamp: dict) -> list[dict]:
    """Markers of the leading run of committed shards of one file that match ``stamp``."""
    parts = []
    while True:
        prefix = shard_prefix(shard_dir, file_index, len(parts))
        marker = _read_json(_marker(prefix))
        if not marker or {k: marker.get(k) for k in stamp} != stamp:
            return parts
        if not (Path(str(prefix) + ".bin").is_file() and Path(str(prefix) + ".idx").is_file()):
            return parts
        parts.append(marker)


# ---------------------------------------------------------------------------------------------
# driver


def _settings(cfg: PreprocessConfig, tokenizer: Tokenizer, dtype) -> dict:
    return {
        "tokenizer_kind": tokenizer.kind,
        "tokenizer_sha256": _sha256(tokenizer.files),
        "eod": tokenizer.eod if cfg.append_eod else None,
        "vocab_size": tokenizer.vocab_size,
        "dtype": np.dtype(dtype).name,
        "text_key": cfg.text_key,
        "text_mode": cfg.text_mode,
        "docs_per_shard": cfg.docs_per_shard,
    }


def _validate(cfg: PreprocessConfig) -> tuple[Tokenizer, list[tuple[Path, str]]]:
    if cfg.text_mode not in ("document", "line"):
        raise ValueError(f"text_mode must be 'document' or 'line', not {cfg.text_mode!r}")
    if cfg.workers < 1:
        raise ValueError(f"workers must be >= 1, not {cfg.workers}")
    if cfg.docs_per_shard < 1:
        raise ValueError(f"docs_per_shard must be >= 1, not {cfg.docs_per_shard}")
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.eod_token)
    files = resolve_inputs(cfg.inputs, cfg.input_format)
    for path, fmt in files:
        _check_input(path, fmt, cfg.text_key, cfg.text_mode)
    out_dir = Path(cfg.output_prefix).expanduser().resolve().parent
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create output directory '{out_dir}': {err}") from err
    if not os.access(out_dir, os.W_OK):
        raise PermissionError(f"output directory '{out_dir}' is not writable")
    return tokenizer, files


def preprocess(cfg: PreprocessConfig) -> PreprocessResult:
    """Tokenize ``cfg.inputs`` into ``cfg.output_prefix``.bin/.idx (see the module docstring)."""
    from megatron.core.datasets.indexed_dataset import DType

    tokenizer, files = _validate(cfg)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    prefix = Path(cfg.output_prefix).expanduser().resolve()
    meta_path = Path(str(prefix) + ".meta.json")
    shard_dir = Path(str(prefix) + ".shards")
    settings = _settings(cfg, tokenizer, dtype)
    sources = [_source_id(path) for path, _ in files]

    meta = _read_json(meta_path)
    if (
        meta
        and meta.get("settings") == settings
        and meta.get("sources") == sources
        and all(Path(str(prefix) + ext).is_file() for ext in (".bin", ".idx"))
    ):
        logger.info("%s.bin/.idx is up to date with its inputs; nothing to do", prefix)
        if not cfg.keep_shards:
            shutil.rmtree(shard_dir, ignore_errors=True)
        return PreprocessResult(**{**meta["result"], "up_to_date": True})

    shard_dir.mkdir(parents=True, exist_ok=True)
    result = PreprocessResult(str(prefix), 0, 0, 0, files=[str(p) for p, _ in files])
    parts_per_file: list[int] = []
    pool = None
    if cfg.workers > 1:
        pool = multiprocessing.get_context("fork").Pool(
            cfg.workers, _init_worker, (str(tokenizer.path), cfg.eod_token, dtype, cfg.append_eod)
        )
    else:
        _set_tokenizer_state(tokenizer, dtype, cfg.append_eod)
    from tqdm.auto import tqdm

    progress = tqdm(
        total=sum(s["size"] for s in sources), unit="B", unit_scale=True, desc="tokenizing",
        disable=not cfg.progress,
    )
    try:
        for file_index, ((path, fmt), source) in enumerate(zip(files, sources)):
            stamp = {"source": source, "settings": settings}
            parts = _process_file(cfg, path, fmt, shard_dir, file_index, stamp, dtype, pool, progress, result)
            parts_per_file.append(len(parts))
            for marker in parts:
                result.documents += marker["documents"]
                result.tokens += marker["tokens"]
                result.skipped_empty += marker["skipped_empty"]
            progress.set_postfix(docs=result.documents, tokens=result.tokens, refresh=False)
    finally:
        progress.close()
        if pool is not None:
            pool.terminate()
            pool.join()

    if result.documents == 0:
        raise ValueError(f"the inputs {result.files} hold no non-empty document")
    _merge(shard_dir, parts_per_file, prefix, dtype, meta_path)
    _check_output(prefix, result)
    _write_json_atomic(meta_path, {"settings": settings, "sources": sources, "result": asdict(result)})
    if not cfg.keep_shards:
        shutil.rmtree(shard_dir, ignore_errors=True)
    logger.info(
        "wrote %s.bin/.idx: %d documents, %d tokens (%d empty skipped; %d shard(s) reused, %d written)",
        prefix, result.documents, result.tokens, result.skipped_empty,
        result.shards_reused, result.shards_written,
    )
    return result


def _process_file(cfg, path, fmt, shard_dir, file_index, stamp, dtype, pool, progress, result) -> list[dict]:
    """Bring the shards of one input file up to date; return their markers in order."""
    parts = _committed_parts(shard_dir, file_index, stamp)
    file_marker = _read_json(_file_marker(shard_dir, file_index))
    if (
        file_marker is not None
        and {k: file_marker.get(k) for k in stamp} == stamp
        and isinstance(file_marker.get("parts"), int)
        and file_marker["parts"] <= len(parts)
    ):
        progress.update(stamp["source"]["size"])
        result.shards_reused += file_marker["parts"]
        return parts[: file_marker["parts"]]

    if parts:
        logger.info("%s: resuming after %d committed shard(s)", path, len(parts))
    result.shards_reused += len(parts)
    writer = _ShardWriter(shard_dir, file_index, len(parts), stamp, dtype, cfg.docs_per_shard)
    docs = iter_documents(
        path, fmt, text_key=cfg.text_key, text_mode=cfg.text_mode, skip=len(parts) * cfg.docs_per_shard
    )
    if pool is None:
        tokenized = ((chunk, _tokenize_chunk(chunk[0])) for chunk in _chunks(docs))
    else:
        tokenized = _ordered_map(
            pool, _tokenize_chunk, _chunks(docs), payload=lambda chunk: chunk[0],
            max_in_flight=2 * cfg.workers,
        )
    done_bytes = 0
    for (_, position), arrays in tokenized:
        for ids in arrays:
            writer.add(ids)
        progress.update(position - done_bytes)
        done_bytes = position
    writer.commit()
    progress.update(stamp["source"]["size"] - done_bytes)
    result.shards_written += writer.written
    parts = _committed_parts(shard_dir, file_index, stamp)
    _write_json_atomic(_file_marker(shard_dir, file_index), {**stamp, "parts": len(parts)})
    return parts


def _merge(shard_dir: Path, parts_per_file: list[int], prefix: Path, dtype, meta_path: Path) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    tmp = Path(str(prefix) + ".tmp")
    builder = IndexedDatasetBuilder(str(tmp) + ".bin", dtype=dtype)
    # add_index runs gc.collect() for every shard, which walks all of the interpreter's objects
    # (~0.2 s with torch and megatron loaded); frozen objects are skipped.
    gc.freeze()
    try:
        for file_index, parts in enumerate(parts_per_file):
            for part in range(parts):
                builder.add_index(str(shard_prefix(shard_dir, file_index, part)))
    finally:
        gc.unfreeze()
    builder.finalize(str(tmp) + ".idx")
    # The old commit marker goes first: a crash between the two renames must not leave a marker
    # that vouches for a mismatched .bin/.idx pair.
    meta_path.unlink(missing_ok=True)
    _publish(tmp, prefix)


def _check_output(prefix: Path, result: PreprocessResult) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    documents, tokens = len(dataset), int(dataset.sequence_lengths.sum())
    if (documents, tokens) != (result.documents, result.tokens):
        raise RuntimeError(
            f"{prefix}.bin/.idx holds {documents} documents / {tokens} tokens, the shards "
            f"{result.documents} / {result.tokens}"
        )


# ---------------------------------------------------------------------------------------------
# command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gdn2-preprocess",
        description="Tokenize raw text (jsonl[.gz], parquet, plain text) into a Megatron indexed "
        "dataset PREFIX.bin/.idx with an end-of-document token after every document. Safe to rerun: "
        "finished shards are reused and an up-to-date output is left alone.",
    )
    p.add_argument("--input", nargs="+", required=True, help="input files, directories or glob patterns")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx, PREFIX.meta.json")
    p.add_argument("--tokenizer", required=True,
                   help="tokenizer.json, SentencePiece .model, or a directory with encoder.json + vocab.bpe")
    p.add_argument("--text-key", default="text",
                   help="JSON field / Parquet column holding the text (default: text)")
    p.add_argument("--format", choices=FORMATS, default=None, help="input format (default: from file names)")
    p.add_argument("--text-mode", choices=("document", "line"), default="document",
                   help="plain text: one document per file (default) or per non-empty line")
    p.add_argument("--eod-token", default=None, help="end-of-document token (default: the tokenizer's)")
    p.add_argument("--no-eod", action="store_true", help="do not append the end-of-document token")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizing processes")
    p.add_argument("--docs-per-shard", type=int, default=100_000,
                   help="records per resumable shard (default: 100000)")
    p.add_argument("--keep-shards", action="store_true", help="keep PREFIX.shards/ after merging")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # Importing megatron.core warns about optional GPU libraries and its index readers log at INFO:
    # neither concerns tokenizing.
    logging.getLogger("megatron").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed")
    cfg = PreprocessConfig(
        inputs=args.input,
        output_prefix=args.output_prefix,
        tokenizer=args.tokenizer,
        text_key=args.text_key,
        input_format=args.format,
        text_mode=args.text_mode,
        eod_token=args.eod_token,
        append_eod=not args.no_eod,
        workers=args.workers,
        docs_per_shard=args.docs_per_shard,
        keep_shards=args.keep_shards,
        progress=not args.no_progress,
    )
    try:
        preprocess(cfg)
    except (ValueError, OSError) as err:
        print(f"gdn2-preprocess: error: {err}", flush=True, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
