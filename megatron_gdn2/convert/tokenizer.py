"""The training tokenizer as a Hugging Face fast tokenizer that encodes text to the same ids.

Accepts what training accepts (megatron_gdn2.data.tokenizers.load_tokenizer): a tokenizer.json, a
SentencePiece BPE .model, or GPT-2 encoder.json + vocab.bpe. The result never adds BOS/EOS (training
data has none but the end-of-document token between documents), and its eos token is that
end-of-document token.

A SentencePiece BPE model becomes a `tokenizers` BPE whose merges are ranked by the SentencePiece
piece scores, with SentencePiece's word split (a run of spaces starts a word, with
allow_whitespace_only_pieces) and dummy prefix, so ids match SentencePiece's exactly (the merges
transformers derives from a .model are ranked by id, which differs for whitespace runs).
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as RustTokenizer
from transformers import PreTrainedTokenizerFast

from megatron_gdn2.data.tokenizers import Tokenizer, load_tokenizer

SPACE = "\u2581"  # SentencePiece's whitespace symbol


class TokenizerConversionError(ValueError):
    pass


def _sentencepiece_tokenizer(path: Path) -> RustTokenizer:
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
    unsupported = []
    if trainer.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        unsupported.append(f"model_type={sentencepiece_model_pb2.TrainerSpec.ModelType.Name(trainer.model_type)}")
    if trainer.treat_whitespace_as_suffix:
        unsupported.append("treat_whitespace_as_suffix=true")
    if normalizer.name != "identity" or normalizer.remove_extra_whitespaces:
        unsupported.append(f"normalizer {normalizer.name!r} (remove_extra_whitespaces="
                           f"{normalizer.remove_extra_whitespaces})")
    if unsupported:
        raise TokenizerConversionError(f"--tokenizer {path}: SentencePiece setting(s) not supported for "
                                       "export: " + ", ".join(unsupported)
                                       + " (BPE with identity normalisation is)")

    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    ranked = []
    for i in range(sp.get_piece_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i):
            continue
        piece = sp.id_to_piece(i)
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-sp.get_score(i), i, left, right))
    merges = [(left, right) for _, _, left, right in sorted(ranked)]

    tok = RustTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=sp.id_to_piece(sp.unk_id()),
                                   fuse_unk=True, byte_fallback=trainer.byte_fallback))
    steps = [normalizers.Prepend(SPACE)] if normalizer.add_dummy_prefix else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPACE)])
    word = f"{SPACE}+[^{SPACE}]*" if trainer.allow_whitespace_only_pieces else f"{SPACE}[^{SPACE}]*"
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(f"{word}|[^{SPACE}]+"), behavior="isolated")
    undo = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if normalizer.add_dummy_prefix:
        undo.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(undo)
    return tok


def _gpt2_tokenizer(encoder: Path, merges: Path) -> RustTokenizer:
    tok = RustTokenizer(models.BPE.from_file(str(encoder), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def hf_tokenizer(spec: str | Path) -> tuple[PreTrainedTokenizerFast, Tokenizer]:
    """(the HF tokenizer, the training tokenizer it reproduces) for a --tokenizer path."""
    source = load_tokenizer(spec)
    if source.kind == "huggingface":
        tok = RustTokenizer.from_file(str(source.files[0]))
    elif source.kind == "sentencepiece":
        tok = _sentencepiece_tokenizer(source.files[0])
    else:
        tok = _gpt2_tokenizer(*source.files)
    eod = tok.id_to_token(source.eod)
    special = {"eos_token": eod, "pad_token": eod}
    if source.kind == "sentencepiece":
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(source.files[0]))
        special.update(unk_token=sp.id_to_piece(sp.unk_id()))
        if sp.bos_id() >= 0:
            special["bos_token"] = sp.id_to_piece(sp.bos_id())
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **special)
    return wrapped, source
