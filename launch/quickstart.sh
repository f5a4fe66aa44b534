#!/usr/bin/env bash
# One-command tour of megatron-gdn2: install what is missing, tokenize a real corpus, train a tiny
# hybrid GDN-2 + sliding-window-attention model (stopping halfway to save, then resuming), and
# print greedy generations from the final checkpoint. Uses the GPU when there is one (bf16),
# the CPU otherwise (fp32).
#
#   bash launch/quickstart.sh                 # corpus: ../shared/data (Wikipedia lead sections)
#   bash launch/quickstart.sh my_corpus.txt   # your own plain-text file (and a BPE tokenizer
#                                             # trained on it)
#
# Environment: PYTHON (default python3), QUICKSTART_DIR (default runs/quickstart, wiped first),
# QUICKSTART_STEPS (default 240).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
OUT="${QUICKSTART_DIR:-$REPO/runs/quickstart}"
STEPS="${QUICKSTART_STEPS:-240}"
SHARED="$REPO/../shared/data"
START=$(date +%s)
say() { echo "[quickstart $(($(date +%s) - START))s] $*"; }

if ! "$PY" -c "import torch, megatron.core, psutil, sentencepiece, tokenizers, megatron_gdn2.training.runner" \
        >/dev/null 2>&1; then
    say "installing megatron-gdn2 and its dependencies: $PY -m pip install -e $REPO"
    "$PY" -m pip install -e "$REPO"
fi
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    say "a CUDA GPU is available: training on it in bf16"
else
    say "no GPU: training on the CPU in fp32 (a few minutes on an idle 2-core machine)"
fi

rm -rf "$OUT"
mkdir -p "$OUT/data"
if [ $# -ge 1 ]; then
    CORPUS="$1"
    [ -r "$CORPUS" ] || { echo "quickstart: cannot read $CORPUS" >&2; exit 2; }
    say "corpus: $CORPUS (your file); training an 8K-token byte-level BPE tokenizer on it"
    TOKENIZER="$OUT/data/tokenizer.json"
    "$PY" - "$CORPUS" "$TOKENIZER" <<'EOF'
import sys
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.train([sys.argv[1]], trainers.BpeTrainer(vocab_size=8192, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
tok.save(sys.argv[2])
EOF
    FORMAT=(--format text --text-mode line)  # every non-empty line a document
    PROMPTS=(--prompt "The" --prompt "It was")
elif [ -d "$SHARED" ]; then
    CORPUS="$SHARED/corpora/wikipedia_vital_summaries/enwiki_vital4_summaries.jsonl.gz"
    TOKENIZER="$SHARED/tokenizers/mistral_v1/tokenizer.model"
    say "corpus: $CORPUS (10,033 English Wikipedia lead sections, from ../shared/data); tokenizer: Mistral v1 SentencePiece (32,000 tokens)"
    FORMAT=()
    PROMPTS=(--prompt "The French Revolution was" --prompt "Photosynthesis is")
else
    echo "quickstart: no ../shared/data next to the repository; pass a plain-text file: bash launch/quickstart.sh corpus.txt" >&2
    exit 2
fi

say "tokenizing into $OUT/data/corpus.{bin,idx}"
"$PY" -m megatron_gdn2.data.preprocess --input "$CORPUS" "${FORMAT[@]}" --tokenizer "$TOKENIZER" \
    --output-prefix "$OUT/data/corpus" --workers 2 --no-progress

# swa_gdn2_tiny widened to d_model 64: GDN-2, MLP, SWA, MLP, twice.
TRAIN=(-m megatron_gdn2.training.pretrain
       --model swa_gdn2_tiny --model-override hidden_size=64 --model-override ffn_hidden_size=192
       --tokenizer "$TOKENIZER" --train-data "$OUT/data/corpus" --split 98,2,0
       --seq-length 128 --micro-batch-size 8 --global-batch-size 8 --train-iters "$STEPS"
       --lr 3e-3 --lr-warmup-tokens $((STEPS * 1024 / 10)) --log-interval 20 --eval-interval $((STEPS / 4)) --eval-iters 4
       --save "$OUT/ckpt" --save-interval $((STEPS / 2)))

say "training $STEPS steps; this first run saves and stops at step $((STEPS / 2))"
"$PY" "${TRAIN[@]}" --exit-interval $((STEPS / 2))
say "same command again: resumes from the step-$((STEPS / 2)) checkpoint and finishes"
"$PY" "${TRAIN[@]}"

say "greedy generations from the final checkpoint:"
"$PY" -m megatron_gdn2.training.generate --load "$OUT/ckpt" --max-new-tokens 24 "${PROMPTS[@]}"
say "done: checkpoints in $OUT/ckpt (see megatron_gdn2/training/checkpointing.py for the layout)"
