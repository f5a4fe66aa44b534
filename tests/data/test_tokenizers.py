"""Tokenizers on the real tokenizer files: losslessness, reference ids, EOD, errors."""
import pickle
import unicodedata

import pytest

from megatron_gdn2.data.tokenizers import TokenizerError, load_tokenizer
from tests.data.conftest import SHARED_DATA, TOKENIZERS

EDGE_CASES = [
    " leading space", "trailing spaces  ", "\n\nleading newlines", "tab\there", "  two leading",
    "café naïve Ærø", "emoji 😀👍🏽", "CJK 漢字かな", "<|endoftext|> as text", "a\r\nwindows line", "x",
]


@pytest.fixture(scope="module")
def texts(wiki_records, book_records):
    # 400 Wikipedia summaries, 50k characters of a book, and the awkward cases above.
    return [r["text"] for r in wiki_records[:400]] + [book_records[0]["text"][:50_000]] + EDGE_CASES


@pytest.mark.parametrize("name", ["gpt2", "mistral_v1"])
def test_lossless_round_trip(name, texts):
    tok = load_tokenizer(TOKENIZERS[name])
    encoded = tok.encode_batch(texts)
    assert encoded[:20] == [tok.encode(t) for t in texts[:20]]
    for text, ids in zip(texts, encoded):
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text


def test_neox_round_trip_is_lossless_up_to_nfc(texts):
    tok = load_tokenizer(TOKENIZERS["neox20b"])
    for text in texts:
        assert unicodedata.is_normalized("NFC", text)
        assert tok.decode(tok.encode(text)) == text
    decomposed = "cafe\u0301"  # e + combining acute accent: NFC composes it
    assert tok.decode(tok.encode(decomposed)) == unicodedata.normalize("NFC", decomposed) != decomposed


def test_gpt2_matches_reference_implementation(wiki_records):
    from transformers import GPT2Tokenizer

    directory = TOKENIZERS["gpt2"]
    reference = GPT2Tokenizer(str(directory / "encoder.json"), str(directory / "vocab.bpe"))
    tok = load_tokenizer(directory)
    plain = [t for t in EDGE_CASES if "<|endoftext|>" not in t]
    for text in [r["text"] for r in wiki_records[:60]] + plain:
        assert tok.encode(text) == reference.encode(text)
    # Unlike transformers, a literal "<|endoftext|>" in raw text stays text: EOD only ever comes
    # from document boundaries.
    assert tok.eod not in tok.encode("<|endoftext|>")
    assert reference.encode("<|endoftext|>") == [tok.eod]


def _piece(name, token_id):
    if name == "mistral_v1":  # SentencePiece decodes control tokens to ""; ask for the piece
        import sentencepiece

        return sentencepiece.SentencePieceProcessor(model_file=str(TOKENIZERS[name])).id_to_piece(token_id)
    return load_tokenizer(TOKENIZERS[name]).decode([token_id])


@pytest.mark.parametrize(
    "name,eod_piece,vocab_size",
    [("gpt2", "<|endoftext|>", 50257), ("neox20b", "<|endoftext|>", 50277), ("mistral_v1", "</s>", 32000)],
)
def test_eod_and_vocab(name, eod_piece, vocab_size):
    tok = load_tokenizer(TOKENIZERS[name])
    assert tok.vocab_size == vocab_size
    assert _piece(name, tok.eod) == eod_piece
    again = pickle.loads(pickle.dumps(tok))
    assert (again.eod, again.vocab_size, again.encode("Pickled tokenizers reload.")) == (
        tok.eod, tok.vocab_size, tok.encode("Pickled tokenizers reload."))


def test_layouts_are_found_from_files_and_directories():
    gpt2 = TOKENIZERS["gpt2"]
    assert load_tokenizer(gpt2 / "encoder.json").encode("hi there") == load_tokenizer(gpt2).encode("hi there")
    assert load_tokenizer(gpt2 / "vocab.bpe").kind == "gpt2-bpe"
    assert load_tokenizer(TOKENIZERS["neox20b"].parent).kind == "huggingface"
    assert load_tokenizer(TOKENIZERS["mistral_v1"].parent).kind == "sentencepiece"
    assert load_tokenizer(TOKENIZERS["mistral_v1"], eod_token="<s>").eod == 1


def test_bad_tokenizers_name_the_path(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "broken.model").write_bytes(b"not a sentencepiece model")
    (tmp_path / "encoder.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("hello")
    cases = {
        tmp_path / "missing": "does not exist",
        tmp_path: "unknown tokenizer directory",
        tmp_path / "broken.json": "could not read huggingface tokenizer",
        tmp_path / "broken.model": "could not read sentencepiece tokenizer",
        tmp_path / "encoder.json": "missing",
        tmp_path / "notes.txt": "unknown tokenizer",
    }
    for path, message in cases.items():
        with pytest.raises(TokenizerError, match=message) as info:
            load_tokenizer(path)
        assert str(path) in str(info.value)
    with pytest.raises(TokenizerError, match="'<none>' is not in the vocabulary"):
        load_tokenizer(SHARED_DATA / "tokenizers" / "gpt2", eod_token="<none>")
