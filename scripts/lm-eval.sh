#!/usr/bin/env bash
# lm-eval against `huginn serve`, beside `huginn eval` on the same questions (not part of CI).
#
#   scripts/lm-eval.sh MODEL TASK.jsonl [DEPTHS] [LIMIT]
#
# MODEL is a model folder with a tokenizer; TASK.jsonl a multiple-choice file in `huginn eval`'s
# text format ({"context", "choices", "gold"}; choices carry their own leading space, so no
# delimiter goes between context and choice). lm-eval comes from PyPI into a venv outside the
# repository ($LM_EVAL_VENV, default ~/.cache/huginn-lm-eval/venv; created once). The server
# takes the depth from the model name (NAME@r=DEPTH); lm-eval's `local-completions` model sends
# each choice as token ids with `echo` and `logprobs`, and scores as its `multiple_choice` tasks
# do. Both tables are printed; their accuracies should agree to the last question.
set -euo pipefail
cd "$(dirname "$0")/.."

model=$(realpath "$1")
task=$(realpath "$2")
depths=${3:-1,4,8}
limit=${4:-}
venv=${LM_EVAL_VENV:-$HOME/.cache/huginn-lm-eval/venv}
port=${PORT:-18089}

if [ ! -x "$venv/bin/lm_eval" ]; then
  echo "== installing lm-eval into $venv (once; with torch, several GB)" >&2
  python3 -m venv "$venv"
  # torch for the CPU alone where its index is reachable; otherwise PyPI's build comes with lm-eval.
  "$venv/bin/pip" install -q torch --index-url https://download.pytorch.org/whl/cpu 2>/dev/null || true
  # lm-eval 0.4.9 with the libraries of its time: transformers 5 and datasets 4 break its imports.
  "$venv/bin/pip" install -q "lm-eval[api]==0.4.9" "transformers>=4.45,<5" "datasets==3.6.0" "huggingface-hub<1"
fi

cargo build -q -p infer --bin huginn
huginn=${CARGO_TARGET_DIR:-target}/debug/huginn

work=$(mktemp -d)
server=""
trap '[ -n "$server" ] && kill "$server" 2>/dev/null; rm -rf "$work"' EXIT

# The task as lm-eval reads a local multiple-choice file.
cat > "$work/huginn_mc.yaml" <<YAML
task: huginn_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: $task
test_split: test
output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{gold}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
YAML

"$huginn" serve --model "$model" --addr "127.0.0.1:$port" --model-name m --max-steps 1024 &
server=$!
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
  sleep 0.2
done

limit_flag=()
[ -n "$limit" ] && limit_flag=(--limit "$limit")
echo "== lm-eval $("$venv/bin/pip" show lm-eval 2>/dev/null | sed -n 's/^Version: //p'), local-completions against huginn serve"
for depth in ${depths//,/ }; do
  echo "-- r=$depth"
  HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 "$venv/bin/lm_eval" --model local-completions \
    --model_args "model=m@r=$depth,base_url=http://127.0.0.1:$port/v1/completions,tokenizer=$model,tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=4,max_retries=1" \
    --tasks huginn_mc --include_path "$work" "${limit_flag[@]}" > "$work/lm-eval-$depth.log" 2>&1 ||
    { tail -20 "$work/lm-eval-$depth.log"; exit 1; }
  grep -E '^\|' "$work/lm-eval-$depth.log"
done

echo "== huginn eval on the same questions"
"$huginn" eval --model "$model" --tasks "$task" --depths "$depths" --out "$work/eval" "${limit_flag[@]}"
