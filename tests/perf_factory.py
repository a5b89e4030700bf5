"""Synthetic saved runs in the format of `pytest bench --benchmark-json F --benchmark-save-data`."""

from __future__ import annotations

import json

import numpy as np

DEVICE = "nvidia-h100-80gb-hbm3"


def case_name(i: int, impl: str = "fastattn") -> str:
    return f"bench/test_local.py::test_local[{impl}-local-fwd-bf16-B1H16L{1024 * (i + 1)}D64-w256x256]"


def make_run(
    cases: dict[str, np.ndarray | list[float]],
    *,
    device: str = DEVICE,
    commit: str = "0123456789abcdef0123456789abcdef01234567",
    commit_time: str = "2026-11-26T20:00:00+00:00",
    run_time: str = "2026-11-26T21:00:00.000000+00:00",
) -> dict:
    """A run holding `cases` ({fullname: per-round seconds}), as pytest-benchmark writes it."""
    benchmarks = []
    for fullname, data in cases.items():
        data = [float(t) for t in data]
        q1, median, q3 = np.percentile(data, [25, 50, 75])
        name = fullname.split("::")[-1]
        benchmarks.append({
            "group": name.split("[")[-1].split("-", 1)[-1].rstrip("]"),
            "name": name,
            "fullname": fullname,
            "params": None,
            "param": None,
            "extra_info": {"impl": name.split("[")[-1].split("-")[0], "device": device},
            "options": {"timer": "cuda_event", "min_rounds": 5},
            "stats": {
                "min": min(data), "max": max(data), "mean": float(np.mean(data)),
                "stddev": float(np.std(data)), "rounds": len(data), "median": float(median),
                "iqr": float(q3 - q1), "q1": float(q1), "q3": float(q3), "iterations": 1,
                "ops": 1 / float(np.mean(data)), "total": float(np.sum(data)), "data": data,
            },
        })
    return {
        "machine_info": {
            "node": "ci", "machine": "x86_64", "cpu": {"brand_raw": "AMD EPYC"},
            "fastattn": {"device": "NVIDIA H100 80GB HBM3" if device == DEVICE else device,
                         "device_slug": device, "commit": commit, "torch": "2.14.1", "cuda": "13.0"},
        },
        "commit_info": {"id": commit, "time": commit_time, "author_time": commit_time, "dirty": False,
                        "project": "fastattn", "branch": "main"},
        "benchmarks": benchmarks,
        "datetime": run_time,
        "version": "5.3.1",
    }


def noisy_cases(rng: np.random.Generator, n_cases: int = 4, rounds: int = 30, noise: float = 0.02,
                factor: float = 1.0, impl: str = "fastattn") -> dict[str, np.ndarray]:
    """Cases of 0.1-0.4 ms with lognormal round noise of relative spread `noise`, times `factor`."""
    return {case_name(i, impl): 1e-4 * (i + 1) * factor * rng.lognormal(0.0, noise, rounds) for i in range(n_cases)}


def write_run(path, run: dict) -> str:
    path.write_text(json.dumps(run))
    return str(path)
