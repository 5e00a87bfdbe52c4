#!/usr/bin/env bash
# The paper-protocol runs behind the README tables (issue: frozen-head experts, the library's default
# budgets, 128 validation examples per task, 3 seeds): methods table, ablations and few-shot curve of
# both benchmarks, in order of cost. Every step resumes where it stopped (run directories under
# $BMM_JAX_RUNS, default ~/.cache/bmm_jax/runs), so rerunning this script after an interruption
# continues; finished steps only re-export their results into experiments/results/.
#
#   bash experiments/run_paper.sh            # all steps
#   bash experiments/run_paper.sh effnet4    # one benchmark
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${BMM_JAX_RUNS:-$HOME/.cache/bmm_jax/runs}"
X=".venv/bin/bmm-experiment"
mkdir -p "$RUNS"
for b in ${1:-effnet4 minilm5}; do
  echo "== $b: methods ($(date))"
  $X --preset paper --benchmark "$b" --run-dir "$RUNS/$b-paper" --export "experiments/results/$b"
  echo "== $b: ablations ($(date))"
  $X --preset paper --benchmark "$b" --run-dir "$RUNS/$b-paper" --ablations \
     --export "experiments/results/ablations_$b"
  echo "== $b: few-shot Grams ($(date))"
  $X --preset paper --benchmark "$b" --run-dir "$RUNS/$b-paper" --fewshot \
     --export "experiments/results/fewshot_$b"
done
echo "== done ($(date))"
