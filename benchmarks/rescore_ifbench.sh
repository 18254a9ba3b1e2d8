#!/usr/bin/env bash
# Issue 20: the scoring variants of the whole-response runs (benchmarks/ablation_ifbench.sh whole,
# whole-pair), applied to their recorded scores by benchmarks/rescore_trace.py; then the tables.
set -euo pipefail
cd "$(dirname "$0")/.."
E=benchmarks/eval; W=$E/weights-ifbench-dev.json; WP=$E/weights-ifbench-dev-pair.json; P="drafters=smollm2+qwen;verifiers=smollm2+qwen"
rm -rf $E/rescored; mkdir -p $E/rescored
.venv/bin/python benchmarks/rescore_trace.py $E/ifbench100-whole.jsonl $E/ifbench100-whole.trace.jsonl.gz --out-dir $E/rescored \
 sum=score=logprob_sum nsv=self_votes=0 qjudge=verifiers=qwen prior=weights=$W fin=finished=1 "fin-sum=finished=1;score=logprob_sum" \
 "fin-nsv=finished=1;self_votes=0" "fin-q=finished=1;verifiers=qwen" "fin-prior=finished=1;weights=$W" \
 "pair=$P" "pair-sum=$P;score=logprob_sum" "pair-nsv=$P;self_votes=0" "pair-q=drafters=smollm2+qwen;verifiers=qwen" "pair-prior=$P;weights=$WP" \
 "pair-fin=$P;finished=1" "pair-fin-sum=$P;finished=1;score=logprob_sum" "pair-fin-nsv=$P;finished=1;self_votes=0" \
 "pair-fin-q=drafters=smollm2+qwen;verifiers=qwen;finished=1" "pair-fin-prior=$P;finished=1;weights=$WP" \
 "pair-fin-prior-sum=$P;finished=1;weights=$WP;score=logprob_sum" "pair-fin-q-sum=drafters=smollm2+qwen;verifiers=qwen;finished=1;score=logprob_sum"
.venv/bin/python benchmarks/rescore_trace.py $E/ifbench100-199-whole-pair.jsonl $E/ifbench100-199-whole-pair.trace.jsonl.gz --out-dir $E/rescored \
 "pair-fin-q=verifiers=qwen;finished=1" "pair-fin-sum=finished=1;score=logprob_sum" "pair-q=verifiers=qwen" "pair-fin=finished=1"

# the tables in benchmarks/RESULTS.md
M=$E/ifbench200-members.jsonl; R=$E/rescored/ifbench100-whole; R2=$E/rescored/ifbench100-199-whole-pair
Q=qwen=$M:qwen2.5-coder-0.5b-instruct; S=smollm2=$M:smollm2-135m-instruct; G=gemma=$M:gemma3-270m
T=benchmarks/ablation_table.py
echo "== ablation, prompts 0-99"
.venv/bin/python $T --limit 100 --against qwen,smollm2 $Q $S $G default=$E/ifbench200-default.jsonl \
  window5=$E/ifbench100-pair-prior-w5.jsonl window10=$E/ifbench100-pair-prior-w10.jsonl window20=$E/ifbench100-pair-prior-w20.jsonl \
  whole=$E/ifbench100-whole.jsonl $(for v in sum nsv qjudge prior fin fin-sum fin-nsv fin-q fin-prior pair pair-sum \
  pair-nsv pair-q pair-prior pair-fin pair-fin-sum pair-fin-nsv pair-fin-q pair-fin-prior pair-fin-prior-sum \
  pair-fin-q-sum; do echo "$v=$R-$v.jsonl"; done)
for lim in "--limit 200" "--skip 100 --limit 100"; do
  echo "== final, $lim"
  .venv/bin/python $T $lim --against qwen,smollm2,default $Q $S $G default=$E/ifbench200-default.jsonl \
    reference=$E/ifbench60-reference.jsonl pair=$R-pair.jsonl+$E/ifbench100-199-whole-pair.jsonl \
    $(for v in pair-q pair-fin pair-fin-sum pair-fin-q; do echo "$v=$R-$v.jsonl+$R2-$v.jsonl"; done)
done

# GSM8K, the first 200 items: the chosen IFBench setting, and each member's own candidate in
# the same run (qwen-own, smollm2-own: the member's greedy answer decoded here; the stored
# members file was decoded in an earlier session on another machine and differs in 2/3 of
# the texts, so the paired comparison is against the same run's candidates)
G8=$E/gsm8k200-whole-pair
.venv/bin/python benchmarks/rescore_trace.py $G8.jsonl $G8.trace.jsonl.gz --out-dir $E/rescored \
  "pair-fin-q=verifiers=qwen;finished=1" "pair-q=verifiers=qwen" "pair-fin=finished=1" \
  "pair-fin-sum=finished=1;score=logprob_sum" qwen-own=drafters=qwen smollm2-own=drafters=smollm2
R3=$E/rescored/gsm8k200-whole-pair
M8=$E/gsm8k200-members.jsonl
echo "== GSM8K, first 200 items"
.venv/bin/python $T --limit 200 --against qwen-own,qwen qwen-own=$R3-qwen-own.jsonl smollm2-own=$R3-smollm2-own.jsonl \
  qwen=$M8:qwen2.5-coder-0.5b-instruct smollm2=$M8:smollm2-135m-instruct default=$E/gsm8k200-prior-exit.jsonl \
  reference=$E/gsm8k200-reference.jsonl pair=$G8.jsonl \
  $(for v in pair-q pair-fin pair-fin-sum pair-fin-q; do echo "$v=$R3-$v.jsonl"; done)
