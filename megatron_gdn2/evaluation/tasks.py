"""Perplexity of a text file and LAMBADA (last-word accuracy and perplexity).

Both score spans of token sequences with one batched routine: sequences are sorted by length,
right-padded (the model is causal, so padding after a sequence never changes its scores) and the
log-probabilities of the target positions summed in fp32.

- Perplexity: the file is tokenised as one stream and cut into windows of `seq_length + 1` tokens
  that overlap by one, so every token but the first is predicted exactly once, from up to
  `seq_length` tokens of its own window. Reported per token, per word (whitespace-separated words
  of the file, as lm-evaluation-harness's wikitext word_perplexity) and as bits per UTF-8 byte.
- LAMBADA: the target is " " + continuation after the context (the OpenAI version's split); a
  record is correct when greedy decoding reproduces every target token; perplexity is
  exp(-mean over records of the target's log-likelihood), as lm-evaluation-harness reports it.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm


@dataclass
class SpanScore:
    logprob: float  # sum over the span's tokens
    tokens: int
    greedy: bool  # every span token is the argmax of its prediction


def score_spans(model, sequences: list[list[int]], starts: list[int], batch_size: int, pad_id: int,
                desc: str) -> list[SpanScore]:
    """For each sequence, the score of its tokens from index `starts[i]` (>= 1) to the end."""
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    scores: list[SpanScore | None] = [None] * len(sequences)
    with torch.no_grad(), tqdm(total=len(sequences), desc=desc, unit="seq") as progress:
        for first in range(0, len(order), batch_size):
            batch = order[first:first + batch_size]
            width = len(sequences[batch[0]])
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, index in enumerate(batch):
                seq = sequences[index]
                ids[row, :len(seq)] = torch.tensor(seq)
                mask[row, :len(seq)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            for row, index in enumerate(batch):
                seq, start = sequences[index], starts[index]
                predictions = logits[row, start - 1:len(seq) - 1].float()
                targets = torch.tensor(seq[start:], device=device)
                logprobs = F.log_softmax(predictions, dim=-1)
                picked = logprobs.gather(-1, targets[:, None]).squeeze(-1)
                scores[index] = SpanScore(logprob=picked.sum().item(), tokens=len(targets),
                                          greedy=bool((predictions.argmax(-1) == targets).all()))
            progress.update(len(batch))
    return scores


def text_perplexity(model, tokenizer, text: str, seq_length: int, batch_size: int,
                    max_tokens: int | None = None) -> dict:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
        text = tokenizer.decode(ids)
    if len(ids) < 2:
        raise ValueError("the text has fewer than 2 tokens: nothing to predict")
    windows = [ids[start:start + seq_length + 1] for start in range(0, len(ids) - 1, seq_length)]
    scores = score_spans(model, windows, [1] * len(windows), batch_size, tokenizer.pad_token_id or 0,
                         desc="perplexity")
    nll = -sum(s.logprob for s in scores)
    tokens = sum(s.tokens for s in scores)
    return {
        "tokens": tokens,
        "token_perplexity": math.exp(nll / tokens),
        "word_perplexity": math.exp(nll / len(text.split())),
        "bits_per_byte": nll / math.log(2) / len(text.encode("utf-8")),
    }


def read_lambada(path: str | Path, limit: int | None = None) -> list[dict]:
    records = []
    with open(path) as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not {"context", "continuation"} <= record.keys():
                raise ValueError(f"{path}:{number}: expected a JSON object with context and continuation")
            records.append(record)
            if limit is not None and len(records) == limit:
                break
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def lambada(model, tokenizer, records: list[dict], batch_size: int) -> dict:
    sequences, starts = [], []
    for record in records:
        target = " " + record["continuation"]
        context = tokenizer(record["context"], add_special_tokens=False)["input_ids"]
        whole = tokenizer(record["context"] + target, add_special_tokens=False)["input_ids"]
        if whole[:len(context)] != context:  # the tokenizer merged across the boundary
            whole = context + tokenizer(target, add_special_tokens=False)["input_ids"]
        sequences.append(whole)
        starts.append(len(context))
    scores = score_spans(model, sequences, starts, batch_size, tokenizer.pad_token_id or 0, desc="lambada")
    return {
        "examples": len(scores),
        "accuracy": sum(s.greedy for s in scores) / len(scores),
        "perplexity": math.exp(-sum(s.logprob for s in scores) / len(scores)),
    }
