#!/usr/bin/env bash
# Cached decoding speed of the authors' model at any shape, built in this process with its own
# random init (no checkpoint written): the reference side of `cargo xtask bench generate` at
# the same shape. Not part of CI.
#
#   scripts/reference-decode.sh --huginn-0125 --dtype bf16 --steps 4 --prompt-len 4 --new-tokens 3
#   scripts/reference-decode.sh --width 256 --heads 4 --layers 2,4,2 --mlp 704 --vocab 2048 --steps 32
#
# The authors' code is ../shared/anchor/recpre (unmodified; $ANCHOR_DIR overrides the folder).
# torch comes from PyPI into the venv compare.sh uses ($ANCHOR_VENV, default
# ~/.cache/huginn-anchor/venv; made once). Flags: scripts/reference_decode.py --help.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv=${ANCHOR_VENV:-$HOME/.cache/huginn-anchor/venv}
if [ ! -x "$venv/bin/python" ]; then
  echo "== creating the reference environment in $venv (torch, transformers 4.53.3; once)" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch numpy safetensors transformers==4.53.3 >&2
fi
exec "$venv/bin/python" "$here/reference_decode.py" "$@"
