"""Text tokenizers for preprocessing and for Megatron-Core's GPT datasets.

``load_tokenizer(spec, eod_token=None) -> Tokenizer`` accepts

- a Hugging Face ``tokenizer.json`` file, or a directory that holds one;
- a SentencePiece ``.model`` file, or a directory that holds ``tokenizer.model``;
- GPT-2 byte-level BPE files: a directory holding ``encoder.json`` and ``vocab.bpe``, or the path
  of either file (the other must sit beside it).

A :class:`Tokenizer` has ``encode(text) -> list[int]``, ``encode_batch(texts)``,
``decode(ids) -> str``, ``eod`` (end-of-document id), ``vocab_size``, ``kind``, ``path`` and
``files`` (the files it was read from).
It never adds BOS/EOS itself: preprocessing appends ``eod`` after every document.

Megatron-Core's datasets read ``tokenizer.eod`` (EOD-based masks and position resets),
``tokenizer.vocab_size`` (token dtype) and ``tokenizer.unique_identifiers`` (part of the hash of
their index caches). They also read ``tokenizer.pad`` when it exists; it deliberately does not
exist here, so partial samples are padded with Megatron's sentinel id -1, which never collides with
a real token (NeoX's ``<|padding|>`` id 1, for example, is an ordinary token in pretraining text).

Which tokenizers are lossless (``decode(encode(x)) == x``): GPT-2 byte-level BPE for any text;
the Mistral v1 SentencePiece model (identity normalisation, byte fallback); GPT-NeoX-20B only for
NFC-normalised text (its tokenizer.json applies NFC first). Hugging Face tokenizers match their
added special tokens inside raw text (NeoX turns a literal ``<|endoftext|>`` into the EOD id);
the GPT-2 BPE and SentencePiece tokenizers here treat such strings as ordinary text.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["Tokenizer", "TokenizerError", "load_tokenizer"]

# End-of-document tokens of common Hugging Face tokenizers, tried in order when the tokenizer has
# no tokenizer_config.json naming its eos_token.
_EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "<|im_end|>")


class TokenizerError(ValueError):
    """A tokenizer path that is missing, of an unknown layout, or unreadable."""


class Tokenizer:
    """A loaded tokenizer; build it with :func:`load_tokenizer`."""

    def __init__(
        self,
        *,
        kind: str,
        path: Path,
        files: Sequence[Path],
        encode: Callable[[str], list[int]],
        encode_batch: Callable[[Sequence[str]], list[list[int]]],
        decode: Callable[[Sequence[int]], str],
        eod: int,
        vocab_size: int,
        eod_token: str | None,
    ) -> None:
        self.kind = kind
        self.path = path
        self.files = tuple(files)
        self._encode = encode
        self._encode_batch = encode_batch
        self._decode = decode
        self.eod = eod
        self.vocab_size = vocab_size
        self._eod_token = eod_token
        # Megatron hashes this into its dataset cache names; the token ids on disk do not depend on
        # where the tokenizer file lives, so the path is left out.
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("kind", kind), ("vocab_size", vocab_size), ("eod", eod)]
        )

    def encode(self, text: str) -> list[int]:
        return self._encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._encode_batch(texts)

    def decode(self, ids: Sequence[int]) -> str:
        return self._decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return (
            f"Tokenizer(kind={self.kind!r}, path='{self.path}', vocab_size={self.vocab_size}, "
            f"eod={self.eod})"
        )

    def __reduce__(self):
        # The Rust/C++ tokenizer objects do not pickle; worker processes reload from the file.
        return (load_tokenizer, (str(self.path), self._eod_token))


def load_tokenizer(spec: str | Path, eod_token: str | None = None) -> Tokenizer:
    """Load the tokenizer at ``spec`` (see the module docstring for the accepted layouts).

    ``eod_token`` overrides the end-of-document token (a token string of the vocabulary); by
    default it is GPT-2's ``<|endoftext|>``, the SentencePiece model's EOS, or the Hugging Face
    tokenizer's eos_token / a well-known end-of-text token.
    """
    path = Path(spec).expanduser()
    if not path.exists():
        raise TokenizerError(f"tokenizer not found: '{path}' does not exist")
    kind, files = _detect(path)
    try:
        if kind == "huggingface":
            return _load_huggingface(files[0], eod_token)
        if kind == "sentencepiece":
            return _load_sentencepiece(files[0], eod_token)
        return _load_gpt2_bpe(files[0], files[1], eod_token)
    except TokenizerError:
        raise
    except Exception as err:  # the tokenizers library raises bare Exceptions on malformed files
        raise TokenizerError(f"could not read {kind} tokenizer '{path}': {err}") from err


def _detect(path: Path) -> tuple[str, list[Path]]:
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return "huggingface", [path / "tokenizer.json"]
        if (path / "tokenizer.model").is_file():
            return "sentencepiece", [path / "tokenizer.model"]
        if (path / "encoder.json").is_file() and (path / "vocab.bpe").is_file():
            return "gpt2-bpe", [path / "encoder.json", path / "vocab.bpe"]
        raise TokenizerError(
            f"unknown tokenizer directory '{path}': expected tokenizer.json, tokenizer.model, "
            "or encoder.json + vocab.bpe inside it"
        )
    if path.name in ("encoder.json", "vocab.bpe"):
        encoder, merges = path.with_name("encoder.json"), path.with_name("vocab.bpe")
        missing = [str(p) for p in (encoder, merges) if not p.is_file()]
        if missing:
            raise TokenizerError(f"GPT-2 BPE tokenizer '{path}' is incomplete: missing {missing}")
        return "gpt2-bpe", [encoder, merges]
    if path.suffix == ".json":
        return "huggingface", [path]
    if path.suffix == ".model":
        return "sentencepiece", [path]
    raise TokenizerError(
        f"unknown tokenizer '{path}': expected a tokenizer.json, a SentencePiece .model, "
        "GPT-2 encoder.json/vocab.bpe, or a directory holding one of these"
    )


def _token_id(lookup: Callable[[str], int | None], token: str, path: Path) -> int:
    token_id = lookup(token)
    if token_id is None:
        raise TokenizerError(f"end-of-document token {token!r} is not in the vocabulary of '{path}'")
    return token_id


def _load_huggingface(path: Path, eod_token: str | None) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer.from_file(str(path))
    if eod_token is None:
        eod_token = _huggingface_eod_token(tok, path)
    return Tokenizer(
        kind="huggingface",
        path=path,
        files=[path],
        encode=lambda text: tok.encode(text, add_special_tokens=False).ids,
        encode_batch=lambda texts: [
            e.ids for e in tok.encode_batch(list(texts), add_special_tokens=False)
        ],
        decode=lambda ids: tok.decode(ids, skip_special_tokens=False),
        eod=_token_id(tok.token_to_id, eod_token, path),
        vocab_size=tok.get_vocab_size(with_added_tokens=True),
        eod_token=eod_token,
    )


def _huggingface_eod_token(tok, path: Path) -> str:
    config = path.with_name("tokenizer_config.json")
    if config.is_file():
        eos = json.loads(config.read_text()).get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str) and tok.token_to_id(eos) is not None:
            return eos
    for candidate in _EOD_CANDIDATES:
        if tok.token_to_id(candidate) is not None:
            return candidate
    raise TokenizerError(
        f"cannot tell the end-of-document token of '{path}': none of {list(_EOD_CANDIDATES)} is in "
        "its vocabulary; pass eod_token explicitly"
    )


def _load_sentencepiece(path: Path, eod_token: str | None) -> Tokenizer:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor()
    if not sp.Load(str(path)):
        raise TokenizerError(f"'{path}' is not a SentencePiece model")

    def piece_id(token: str) -> int | None:
        i = sp.piece_to_id(token)
        return None if i == sp.unk_id() and token != sp.id_to_piece(i) else i

    if eod_token is None:
        if sp.eos_id() < 0:
            raise TokenizerError(f"SentencePiece model '{path}' has no EOS token; pass eod_token explicitly")
        eod = sp.eos_id()
    else:
        eod = _token_id(piece_id, eod_token, path)
    return Tokenizer(
        kind="sentencepiece",
        path=path,
        files=[path],
        encode=lambda text: sp.encode(text),
        encode_batch=lambda texts: sp.encode(list(texts)),
        decode=lambda ids: sp.decode(ids),
        eod=eod,
        vocab_size=sp.get_piece_size(),
        eod_token=eod_token,
    )


def _load_gpt2_bpe(encoder: Path, merges: Path, eod_token: str | None) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    tok = HFTokenizer(models.BPE.from_file(str(encoder), str(merges)))
    # GPT-2's own pre-tokenisation regex and byte-to-unicode mapping; <|endoftext|> stays an
    # ordinary vocabulary entry, so text can never produce it and EOD marks only real boundaries.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return Tokenizer(
        kind="gpt2-bpe",
        path=encoder.parent,
        files=[encoder, merges],
        encode=lambda text: tok.encode(text).ids,
        encode_batch=lambda texts: [e.ids for e in tok.encode_batch(list(texts))],
        decode=lambda ids: tok.decode(ids, skip_special_tokens=False),
        eod=_token_id(tok.token_to_id, eod_token or "<|endoftext|>", encoder),
        vocab_size=tok.get_vocab_size(),
        eod_token=eod_token,
    )
