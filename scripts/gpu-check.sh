#!/usr/bin/env bash
# The accelerator check, prepared here and run once on a GPU machine that has no Rust toolchain.
#
#   bash scripts/gpu-check.sh pack   # here: build huginn-gpu-check (wgpu), strip and compress it,
#                                    # fetch the Vulkan loader; everything goes to .gpu/ (ignored)
#   bash scripts/gpu-check.sh run    # there, with .gpu carried: unpack, then parity on every
#                                    # reference fixture, generation at Huginn-0125's shape
#                                    # (float, then 8- and 4-bit linears),
#                                    # training speed, and training on every GPU the machine has
#                                    # (1, 2, …, n of them; one GPU says so); the figures go to
#                                    # $OUT (or gpu-check/)
#
# The binary is x86-64 Linux, built against this machine's glibc (2.36). Extra arguments of
# `run` go to huginn-gpu-check (e.g. --bandwidth-gbs 3350 for an H100).
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
pack)
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/huginn-rs/target}"
  cargo build -p analysis --features model/wgpu --bin huginn-gpu-check
  mkdir -p .gpu
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude
  strip -o .gpu/huginn-gpu-check "$CARGO_TARGET_DIR/debug/huginn-gpu-check"
  xz -f -T0 -6 .gpu/huginn-gpu-check
  (cd .gpu && rm -f ./*.deb && apt-get download libvulkan1 >/dev/null)
  du -ch .gpu/* | tail -1
  ;;
run)
  shift
  out="${OUT:-gpu-check}"
  mkdir -p "$out"
  # The Vulkan loader, if the machine lacks it; the NVIDIA driver provides the ICD.
  if ! ldconfig -p | grep -q libvulkan.so.1; then
    for f in .gpu/*.deb; do dpkg -x "$f" /; done
    ldconfig
  fi
  if [ -z "$(ls /usr/share/vulkan/icd.d/ /etc/vulkan/icd.d/ 2>/dev/null)" ] &&
    [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ]; then
    export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
  fi
  xz -dc .gpu/huginn-gpu-check.xz >/tmp/huginn-gpu-check 2>/dev/null ||
    python3 -c 'import lzma, shutil; shutil.copyfileobj(lzma.open(".gpu/huginn-gpu-check.xz"), open("/tmp/huginn-gpu-check", "wb"))'
  chmod +x /tmp/huginn-gpu-check
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$out/gpu.txt" 2>&1 || true
  /tmp/huginn-gpu-check --device wgpu --out "$out" --fixtures fixtures/reference/*/ "$@" 2>&1 |
    tee "$out/gpu-check.log"
  ;;
*)
  echo "usage: bash scripts/gpu-check.sh pack|run [huginn-gpu-check flags]" >&2
  exit 2
  ;;
esac
