#!/usr/bin/env bash
# Issue 20's IFBench measurement (parts 3-4). Every run is `specem-fast eval` into its
# own results file under benchmarks/eval/, so each step resumes where a killed run
# stopped (rerun the step; finished records are never redone). Greedy, 256 new
# tokens, the default dtype. IFBench prompts from 200 on, and GSM8K items from 1000
# on, are never read (eval refuses them).
#
#   bash benchmarks/ablation_ifbench.sh members     # each member alone on prompts 0-199
#   bash benchmarks/ablation_ifbench.sh calibrate   # IFBench prior from the members' answers on 100-199
#   bash benchmarks/ablation_ifbench.sh calibrate-pair  # the same prior for SmolLM2 + Qwen2.5-Coder alone
#   bash benchmarks/ablation_ifbench.sh window 20   # windowed rounds, the pair with its IFBench prior, 0-99
#   bash benchmarks/ablation_ifbench.sh whole       # whole-response candidates (window = 256) on 0-99,
#                                                   # all three members, traced: the scoring variants
#                                                   # are rescored from this trace (rescore_trace.py)
#   bash benchmarks/ablation_ifbench.sh whole-pair  # SmolLM2 + Qwen2.5-Coder, whole responses, on 100-199
#   bash benchmarks/ablation_ifbench.sh gsm8k-pair  # the same on the first 200 GSM8K items
#   bash benchmarks/ablation_ifbench.sh default     # the default preset on prompts 0-199
#
# OMP_NUM_THREADS=1: on the 2-core development VMs one thread per process is
# faster than two (benchmarks/RESULTS.md); run two steps side by side instead.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
E=benchmarks/eval
MEMBERS=smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct,gemma3-270m
run() { .venv/bin/specem-fast eval ifbench "$@" --max-new-tokens 256 --cache-tokens 1024; }

case "${1:-}" in
  members)
    # prompts 0-59 were answered in an earlier session with the same settings
    # (ifbench60-members.jsonl; greedy float32 answers do not depend on the batch)
    [ -e "$E/ifbench200-members.jsonl" ] || cp "$E/ifbench60-members.jsonl" "$E/ifbench200-members.jsonl"
    run --limit 200 --batch 20 --preset reference --systems "$MEMBERS" --out "$E/ifbench200-members.jsonl" ;;
  calibrate)
    # reads the members' answers on prompts 100-199 from the file above (same settings: nothing is rerun)
    .venv/bin/specem-fast calibrate ifbench --preset reference --max-new-tokens 256 --cache-tokens 1024 \
      --batch 20 --results "$E/ifbench200-members.jsonl" --out "$E/weights-ifbench-dev.json" ;;
  calibrate-pair)
    # the same calibration for SmolLM2 + Qwen2.5-Coder alone: a member's answers do not depend
    # on the other members, so the pair's prior comes from the calibration above's counts
    .venv/bin/python - "$E/weights-ifbench-dev.json" "$E/weights-ifbench-dev-pair.json" <<'PY'
import json, sys
from specem_fast.rounds.weights import WeightBook, weights_from_accuracy
src = json.load(open(sys.argv[1]))
cal = dict(src["calibration"])
pair = ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"]
cal["accuracy"] = {m: cal["accuracy"][m] for m in pair}
book = WeightBook(pair)
book.set_prior(weights_from_accuracy({m: cal["accuracy"][m]["correct"] for m in pair},
                                     {m: cal["accuracy"][m]["graded"] for m in pair},
                                     power=cal["power"], floor=cal["floor"]), cal)
book.save(sys.argv[2])
print(book.prior)
PY
    ;;
  window)
    # windowed rounds with the pair and its IFBench prior, prompts 0-99: bash ... window 20
    run --limit 100 --batch 20 --preset reference --window "$2" --no-singles \
      --models smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct \
      --weights "$E/weights-ifbench-dev-pair.json" --init-weights prior \
      --out "$E/ifbench100-pair-prior-w$2.jsonl" --trace "$E/ifbench100-pair-prior-w$2.trace.jsonl" ;;
  whole)
    run --limit 100 --batch 20 --preset reference --window 256 --no-singles \
      --out "$E/ifbench100-whole.jsonl" --trace "$E/ifbench100-whole.trace.jsonl" ;;
  whole-pair)
    # SmolLM2 + Qwen2.5-Coder only, whole responses, on prompts 100-199 (0-99 are the
    # three-member run's candidates rescored: a member's candidate does not depend on the others)
    run --skip 100 --limit 100 --batch 20 --preset reference --window 256 --no-singles \
      --models smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct \
      --out "$E/ifbench100-199-whole-pair.jsonl" --trace "$E/ifbench100-199-whole-pair.trace.jsonl" ;;
  gsm8k-pair)
    # the same pair, whole responses, on the first 200 GSM8K items
    .venv/bin/specem-fast eval gsm8k --limit 200 --batch 25 --preset reference --window 256 --no-singles \
      --max-new-tokens 256 --cache-tokens 1024 --models smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct \
      --out "$E/gsm8k200-whole-pair.jsonl" --trace "$E/gsm8k200-whole-pair.trace.jsonl" ;;
  default)
    # the default preset with the default members: shipped prior + exit 0.2/2 + skip-agreed
    run --limit 200 --batch 20 --no-singles --out "$E/ifbench200-default.jsonl" \
      --trace "$E/ifbench200-default.trace.jsonl" ;;
  *)
    echo "usage: $0 members|calibrate|calibrate-pair|window N|whole|whole-pair|gsm8k-pair|default" >&2; exit 2 ;;
esac
