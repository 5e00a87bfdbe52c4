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
SEEDS=(0 1 2)
for b in ${1:-effnet4 minilm5}; do
  echo "== $b: methods ($(date))"
  $X --preset paper --benchmark "$b" --run-dir "$RUNS/$b-paper" --export "experiments/results/$b"
  # ablations and few-shot seed by seed (each export holds the seeds finished so far); their searches
  # that equal a methods-table search continue that study instead of running it again
  done_seeds=()
  for s in "${SEEDS[@]}"; do
    done_seeds+=("$s")
    echo "== $b: ablations, seeds ${done_seeds[*]} ($(date))"
    $X --preset paper --benchmark "$b" --seeds "${done_seeds[@]}" --run-dir "$RUNS/$b-paper" --ablations \
       --export "experiments/results/ablations_$b"
    echo "== $b: few-shot Grams, seeds ${done_seeds[*]} ($(date))"
    $X --preset paper --benchmark "$b" --seeds "${done_seeds[@]}" --run-dir "$RUNS/$b-paper" --fewshot \
       --export "experiments/results/fewshot_$b"
  done
done
echo "== done ($(date))"
