#!/usr/bin/env bash
# Issue 8's measurement: every run is `specem-fast eval` into its own results file
# under benchmarks/eval/, so each step resumes where a killed or timed-out run
# stopped (rerun this script; finished records are never redone). Greedy, 256 new
# tokens, the default dtype. GSM8K items 1000+ are never touched.
#
#   bash benchmarks/ablation_gsm8k.sh calibrate   # members alone on GSM8K 300-399 -> prior weights
#   bash benchmarks/ablation_gsm8k.sh ablation    # first 60 items: reference (+ members), each option alone
#   bash benchmarks/ablation_gsm8k.sh final       # first 200 items and 60 IFBench prompts:
#                                                 # members alone, the recommended setting,
#                                                 # the reference method
#
# The repository keeps finished round traces gzip-compressed (*.trace.jsonl.gz,
# read as they are by `plot` and benchmarks/reward_vs_accuracy.py); before resuming
# a run whose trace is compressed, `gzip -d` it so the rest is appended to it.
#
# OMP_NUM_THREADS=1: on the 2-core development VMs one thread per process was
# faster than two (benchmarks/RESULTS.md); run two steps side by side instead.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
E=benchmarks/eval
W=$E/weights-gsm8k-dev.json
# Prior weights from the first 46 calibration items, which every prior run uses;
# the 100-item calibration ($W) ended at the same weights (0.033 / 0.933 / 0.033).
P46=$E/weights-gsm8k-dev-partial46.json
run() { .venv/bin/specem-fast eval "$@" --max-new-tokens 256 --cache-tokens 1024; }
ens() { local name=$1; shift; run gsm8k --limit 60 --batch 30 --no-singles --out "$E/gsm8k60-$name.jsonl" \
          --trace "$E/gsm8k60-$name.trace.jsonl" "$@"; }

case "${1:-}" in
  calibrate)
    .venv/bin/specem-fast calibrate gsm8k --skip 300 --limit 100 --max-new-tokens 256 --batch 25 \
      --cache-tokens 1024 --out "$W" ;;
  ablation)
    # The members alone on these items are the first 60 of gsm8k200-members.jsonl
    # (`final`), and the recommended combination's are the first 60 of
    # gsm8k200-prior-exit.jsonl, so neither is rerun here. (The reference file's
    # first 26 items also hold the members' answers: it ran without --no-singles.)
    # the reference's file holds 200 items once `final` has run (its first 60 are these)
    run gsm8k --limit 60 --batch 30 --no-singles --out "$E/gsm8k200-reference.jsonl" \
      --trace "$E/gsm8k200-reference.trace.jsonl"
    ens skip-agreed --skip-agreed
    # 0.3 never triggers under the reference schedule (lowest weight in its trace: 0.318)
    ens exit --exit-threshold 0.325 --exit-patience 3
    ens prior --weights "$P46" --init-weights prior
    ens no-self-votes --no-self-votes
    ens constant-lr --hedge-schedule constant
    # batch 10 (the last --batch wins): each batch starts from what the earlier ones learned
    ens learned --batch 10 --init-weights learned --save-weights "$E/weights-learned-gsm8k60.json" ;;
  final)
    # Members alone (the first 26 items' answers were carried over from the
    # reference run's file: same settings, float32 greedy is batch-independent).
    MEMBERS=smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct,gemma3-270m
    PRIOR_EXIT=(--weights "$P46" --init-weights prior --exit-threshold 0.2 --exit-patience 2 --skip-agreed)
    run gsm8k --limit 200 --batch 25 --systems "$MEMBERS" --out "$E/gsm8k200-members.jsonl"
    run gsm8k --limit 200 --batch 25 --no-singles "${PRIOR_EXIT[@]}" \
      --out "$E/gsm8k200-prior-exit.jsonl" --trace "$E/gsm8k200-prior-exit.trace.jsonl"
    run gsm8k --limit 200 --batch 20 --no-singles --out "$E/gsm8k200-reference.jsonl" \
      --trace "$E/gsm8k200-reference.trace.jsonl"
    run ifbench --limit 60 --batch 20 --systems "$MEMBERS" --out "$E/ifbench60-members.jsonl"
    run ifbench --limit 60 --batch 20 --no-singles --out "$E/ifbench60-reference.jsonl" \
      --trace "$E/ifbench60-reference.trace.jsonl"
    run ifbench --limit 60 --batch 20 --no-singles "${PRIOR_EXIT[@]}" \
      --out "$E/ifbench60-prior-exit.jsonl" --trace "$E/ifbench60-prior-exit.trace.jsonl" ;;
  *)
    echo "usage: $0 calibrate|ablation|final" >&2; exit 2 ;;
esac
