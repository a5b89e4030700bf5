"""What a run was timed on: device name and slug, versions, commit and the device's peak rates.

The slug keys the gate's baselines (``bench/baselines/<slug>.json``): the GPU's full name
(``nvidia-h100-80gb-hbm3``), or ``cpu-<model>`` on a machine without one.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]

# Dense peak rates by datasheet (TFLOP/s without sparsity; GB/s of device memory). float32 is
# the plain (non-tensor-core) rate: fastattn computes float32 without TF32. Keys are matched
# as substrings of the lower-cased device name, most specific first.
_PEAKS = [
    ("h100 pcie", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0}, 2000.0),
    ("h100 nvl", {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0}, 3900.0),
    ("h100", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}, 3350.0),
    ("h200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}, 4800.0),
    ("a100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}, 2039.0),
]


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_name(device: torch.device | str | None = None) -> str:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def device_slug(name: str, is_gpu: bool) -> str:
    return slugify(name) if is_gpu else "cpu-" + slugify(name)


def peaks(name: str) -> tuple[dict[str, float] | None, float | None]:
    """(peak TFLOP/s per dtype, peak GB/s) of a known GPU, else (None, None)."""
    lowered = name.lower()
    for key, tflops, gbps in _PEAKS:
        if key in lowered:
            return dict(tflops), gbps
    return None, None


def git_commit() -> str:
    """$FASTATTN_COMMIT where set (a copy of the checkout whose .git is missing or stale, e.g.
    on a lent GPU box: its git metadata named an older commit than the tree it ran); else HEAD
    of the checkout."""
    explicit = os.environ.get("FASTATTN_COMMIT")
    if explicit:
        return explicit
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10, check=True)
        if out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def _driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True)
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def machine_info() -> dict:
    """The ``machine_info["fastattn"]`` record of a run."""
    on_gpu = torch.cuda.is_available()
    name = device_name()
    peak_tflops, peak_gbps = peaks(name) if on_gpu else (None, None)
    info = {
        "device": name,
        "device_slug": device_slug(name, on_gpu),
        "commit": git_commit(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "driver": _driver() if on_gpu else "none",
        "peak_tflops": peak_tflops,
        "peak_gbps": peak_gbps,
    }
    if on_gpu:
        props = torch.cuda.get_device_properties(0)
        info["sm_count"] = props.multi_processor_count
        info["capability"] = f"{props.major}.{props.minor}"
        info["l2_bytes"] = getattr(props, "L2_cache_size", None)
    return info
