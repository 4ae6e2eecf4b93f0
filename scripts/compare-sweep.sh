#!/usr/bin/env bash
# Our speed against the authors' PyTorch reference across model shapes: runs
# ../shared/anchor/compare.sh (unmodified) once per shape and round, and prints one table, a
# line per shape with its decode, prefill and training ratios (ours / reference; above 1 = we
# are faster) and the worst of them.
#
#   scripts/compare-sweep.sh [ROUNDS]            # default 2 rounds of every shape
#   SWEEP_SHAPES="256:4:2,4,2:2048 ..." scripts/compare-sweep.sh 1
#
# A shape is WIDTH:HEADS:LAYERS:VOCAB (the MLP is width·11/4, the shape `cargo xtask bench
# train` builds, so the training line compares like with like). The default set covers widths
# 128-512, heads of 32 and 64 dimensions, layouts (1,4,1) (2,4,2) (2,2,2) (1,8,1) and
# vocabularies 1,024-32,768, each layout and head size twice. ANCHOR_RUNS (default 3) is
# passed on.
# Run it from the repository root on a quiet machine; every line of the anchor's output goes
# to $SWEEP_LOG (default a temporary file, named at the end), the table to stdout and, as JSON
# lines, to $SWEEP_JSON when set.
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=${1:-2}
export ANCHOR_RUNS=${ANCHOR_RUNS:-3}
shapes=${SWEEP_SHAPES:-"256:4:2,4,2:2048 128:4:1,4,1:1024 128:2:2,2,2:4096 384:6:1,4,1:4096 384:12:2,4,2:8192 512:8:1,8,1:32768 512:16:2,2,2:16384 256:8:1,8,1:32768"}
log=${SWEEP_LOG:-$(mktemp -t compare-sweep.XXXXXX.log)}
anchor=../shared/anchor/compare.sh
[ -f "$anchor" ] || { echo "no $anchor: run from the repository root beside ../shared" >&2; exit 1; }

results=$(mktemp)
trap 'rm -f "$results"' EXIT
for round in $(seq 1 "$rounds"); do
  for shape in $shapes; do
    IFS=: read -r width heads layers vocab <<<"$shape"
    if (( width % heads != 0 || width * 11 % 4 != 0 )); then
      echo "shape $shape: heads must divide the width, and width·11/4 must be whole" >&2
      exit 1
    fi
    mlp=$((width * 11 / 4))
    echo "== round $round, shape $shape (MLP $mlp)" | tee -a "$log" >&2
    line=$(ANCHOR_WIDTH=$width ANCHOR_HEADS=$heads ANCHOR_LAYERS=$layers ANCHOR_MLP=$mlp ANCHOR_VOCAB=$vocab \
      bash "$anchor" 2>>"$log" | tee -a "$log" | tail -n 1)
    printf '%s\t%s\t%s\n' "$shape" "$round" "$line" >>"$results"
  done
done

python3 - "$results" "${SWEEP_JSON:-}" <<'PY'
import json, sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1])]
out = open(sys.argv[2], "a") if sys.argv[2] else None
print(f"{'width:heads:layers:vocab':26} {'head dim':>8} {'round':>5} {'decode':>7} {'prefill':>7} {'train':>7} {'worst':>7}")
for shape, rnd, line in rows:
    r = json.loads(line)
    width, heads, layers, vocab = shape.split(":")
    ratios = [r["decode_ratio"], r["prefill_ratio"], r["train_ratio"]]
    print(f"{shape:26} {int(width) // int(heads):8} {rnd:>5} {ratios[0]:7.2f} {ratios[1]:7.2f} {ratios[2]:7.2f} {min(ratios):7.2f}")
    if out:
        out.write(json.dumps({"shape": shape, "round": int(rnd), **r}) + "\n")
PY
echo "log: $log" >&2
