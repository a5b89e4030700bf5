#!/usr/bin/env bash
# Does a stable-ABI library built against one torch load and run under another (docs/install.md)?
#   tools/stable_abi_probe.sh BUILD_PYTHON [RUN_PYTHON ...]
# Compiles tools/stable_abi_probe.cpp against BUILD_PYTHON's torch with TORCH_TARGET_VERSION=2.10
# (CPU only: it needs no nvcc), then loads it and checks its result under each RUN_PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
build_py="$1"
shift
out="${OUT:-results/stable-abi}"
mkdir -p "$out"
torch_dir=$("$build_py" -c 'import os, torch; print(os.path.dirname(torch.__file__))')
"${CXX:-c++}" -O2 -shared -fPIC -std=c++17 -DTORCH_TARGET_VERSION=0x020a000000000000 \
  -I"$torch_dir/include" tools/stable_abi_probe.cpp -o "$out/probe.so" \
  -L"$torch_dir/lib" -ltorch_cpu -lc10
echo "built against torch $("$build_py" -c 'import torch; print(torch.__version__)')"
for py in "$@"; do
  LD_BIND_NOW=1 "$py" -c "
import torch
torch.ops.load_library('$out/probe.so')
q = torch.arange(6, dtype=torch.float32).reshape(2, 3)
out, count = torch.ops.probe.scaled(q, None, 1, 2.0)
assert torch.equal(out, q * 2 + 1) and count.shape == (1,), out
print('loaded and ran under torch', torch.__version__)
"
done
