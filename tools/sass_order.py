"""Dev probe, no GPU needed: the order in which a compiled kernel issues its wgmmas, waits,
exponentials and packs, as ptxas scheduled them (not as the source or the PTX says).

    python tools/sass_order.py OBJECT.o KERNEL_SUBSTRING

OBJECT.o: e.g. `nvcc ... -gencode=arch=compute_90a,code=sm_90a -c csrc/cuda/fwd_bf16.cu`.
Needs cuobjdump (the CUDA toolkit's, or the copy triton ships). One letter per instruction
class, runs counted: M wgmma, W<n> wgmma wait (at most n groups left), B named barrier,
m FMNMX, x FMUL, e MUFU.EX2, c F2FP (pack). Shows, for instance, whether the softmax runs
before the wait for the product it should overlap ("W1 m66 ... W0") or after it ("W1 m1 W0").
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

CLASSES = [("HGMMA", "M"), ("BAR.SYNC", "B"), ("BAR.ARV", "B"), ("FMNMX", "m"),
           ("FMUL", "x"), ("MUFU.EX2", "e"), ("F2FP", "c")]


def cuobjdump() -> str:
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton  # noqa: PLC0415  (only for the binary it ships)
    except ImportError:
        sys.exit("no cuobjdump on PATH and no triton to borrow it from")
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def order(instructions: list[str]) -> str:
    letters = []
    for ins in instructions:
        if "DEPBAR" in ins and "gsb0" in ins:
            letters.append("W" + ins.rstrip(" ;")[-1])
            continue
        letters.extend(letter for key, letter in CLASSES if ins.startswith(key))
    text = "".join(letters)
    return re.sub(r"([Mmxec])\1*", lambda m: f"{m.group(1)}{len(m.group(0))} ", text)


def main() -> int:
    obj, pattern = sys.argv[1], sys.argv[2]
    sass = subprocess.run([cuobjdump(), "-sass", obj], check=True, capture_output=True,
                          text=True).stdout
    found = False
    for function in re.split(r"\n\s*Function : ", sass)[1:]:
        name = function.split("\n", 1)[0]
        if pattern not in name:
            continue
        found = True
        instructions = [m.group(1).strip() for m in
                        re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?(.*?);", function)]
        print(name)
        print("  ", order(instructions))
    return 0 if found else 1


if __name__ == "__main__":
    sys.exit(main())
