"""gdn2-eval on the exported HF directory and on the Megatron checkpoint it came from."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from megatron_gdn2.evaluation.cli import main
from megatron_gdn2.evaluation.loading import load_model
from megatron_gdn2.evaluation.tasks import lambada, read_lambada, score_spans, text_perplexity
from tests.hf.conftest import LAMBADA, WIKITEXT

LIMITS = ["--max-tokens", "300", "--max-examples", "6", "--seq-length", "64", "--batch-size", "4"]


def test_hf_directory_and_megatron_checkpoint_give_the_same_results(converted, tmp_path, capsys):
    results = {}
    sources = {"hf": converted.hf_dir("swa_gdn2_tiny"), "megatron": converted.checkpoint("swa_gdn2_tiny")}
    for kind, path in sources.items():
        output = tmp_path / f"{kind}.json"
        assert main([str(path), *LIMITS, "--output", str(output)]) == 0
        results[kind] = json.loads(output.read_text())["tasks"]
        table = capsys.readouterr().out
        assert "token_perplexity" in table and "accuracy" in table
    assert results["hf"]["perplexity"]["tokens"] == 299
    assert results["hf"]["lambada"]["examples"] == 6
    for task in ("perplexity", "lambada"):
        for metric, value in results["hf"][task].items():
            if isinstance(value, float):
                assert value == pytest.approx(results["megatron"][task][metric], rel=1e-6), (task, metric)


def test_perplexity_equals_a_direct_computation(converted):
    model, tokenizer = load_model(converted.hf_dir("gdn2_tiny"))
    text = WIKITEXT.read_text()[:3000]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:101]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    nll = F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
    # Windows of 25 tokens of context: four windows, every token after the first predicted once.
    result = text_perplexity(model, tokenizer, text, seq_length=25, batch_size=3, max_tokens=101)
    assert result["tokens"] == 100
    window_nll = 0.0
    for start in range(0, 100, 25):
        window = torch.tensor([ids[start:start + 26]])
        with torch.no_grad():
            out = model(window).logits[0, :-1]
        window_nll += F.cross_entropy(out, window[0, 1:], reduction="sum").item()
    assert result["token_perplexity"] == pytest.approx(math.exp(window_nll / 100), rel=1e-5)
    text_bytes = len(tokenizer.decode(ids).encode())
    assert result["bits_per_byte"] == pytest.approx(window_nll / math.log(2) / text_bytes, rel=1e-5)
    whole = text_perplexity(model, tokenizer, text, seq_length=100, batch_size=1, max_tokens=101)
    assert whole["token_perplexity"] == pytest.approx(math.exp(nll / 100), rel=1e-5)


def test_lambada_scores_and_greedy_accuracy(converted):
    model, tokenizer = load_model(converted.hf_dir("swa_gdn2_tiny"))
    records = read_lambada(LAMBADA, limit=4)
    batched = lambada(model, tokenizer, records, batch_size=4)
    single = lambada(model, tokenizer, records, batch_size=1)
    assert batched["perplexity"] == pytest.approx(single["perplexity"], rel=1e-6)

    # The model's own greedy continuations are "correct"; one changed token makes them wrong.
    prompts = [tokenizer(r["context"], add_special_tokens=False)["input_ids"][-20:] for r in records[:3]]
    sequences = []
    for prompt in prompts:
        generated = model.generate(torch.tensor([prompt]), max_new_tokens=3, min_new_tokens=3,
                                   do_sample=False)
        sequences.append(generated[0].tolist())
    wrong = sequences[1][:-1] + [(sequences[1][-1] + 1) % model.config.vocab_size]
    scores = score_spans(model, [*sequences, wrong], [20] * 4, batch_size=4, pad_id=0, desc="test")
    assert [s.greedy for s in scores] == [True, True, True, False]
    assert all(s.tokens == 3 for s in scores)


def test_bad_inputs_name_the_argument(converted, tmp_path, capsys):
    assert main([str(converted.hf_dir("gdn2_tiny")), "--text", str(tmp_path / "missing.txt")]) == 2
    assert "--text" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_lambada(bad)
    assert main([str(tmp_path / "nowhere"), "--lambada", ""]) == 2
    assert "does not exist" in capsys.readouterr().err
