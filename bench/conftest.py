"""Options, parametrization and machine_info of the benchmark suite (``pytest bench --benchmark-only``).

Each test is one (implementation x case x direction); its pytest-benchmark group is the case
in that direction, so fastattn and its peers share one table. The device is the GPU when
there is one, else the CPU.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from bench.peers import IMPLS
from fastattn.perf import device as perf_device
from fastattn.perf.cases import DIRECTIONS, DTYPES, SETS, case_set
from fastattn.perf.timing import TimingConfig

# fast-transformers as `make fast-transformers` builds it for this torch (a peer when present).
_FT_SITE = Path(__file__).resolve().parents[1] / ".ft" / f"torch{torch.__version__.replace('+', '_')}" / "site"
if _FT_SITE.is_dir() and str(_FT_SITE) not in sys.path:
    sys.path.insert(0, str(_FT_SITE))


def _csv(choices):
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(v.strip() for v in text.split(",") if v.strip())
        bad = [v for v in values if v not in choices]
        if bad:
            raise pytest.UsageError(f"{bad} not among {list(choices)}")
        return values

    return parse


def pytest_addoption(parser):
    group = parser.getgroup("fastattn benchmarks")
    group.addoption("--shapes", choices=("auto",) + SETS, default="auto",
                    help="case set; auto = default on a GPU, smoke on a CPU")
    group.addoption("--impl", type=_csv(tuple(IMPLS)), default=tuple(IMPLS),
                    help=f"comma-separated implementations to run, among {','.join(IMPLS)}")
    group.addoption("--dtype", type=_csv(tuple(DTYPES)), default=tuple(DTYPES),
                    help="comma-separated dtypes to run (fp32,bf16,fp16)")
    group.addoption("--direction", type=_csv(DIRECTIONS), default=DIRECTIONS,
                    help="comma-separated directions to run (fwd,bwd,fwd+bwd)")
    group.addoption("--no-flush-l2", action="store_true",
                    help="do not flush the L2 cache before each timed round (GPU)")
    group.addoption("--bench-budget", type=float, default=None,
                    help="timed seconds per benchmark, about (default 0.4 GPU, 0.15 CPU)")


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def pytest_generate_tests(metafunc):
    if "bench_item" not in metafunc.fixturenames:
        return
    config = metafunc.config
    shapes = config.getoption("shapes")
    if shapes == "auto":
        shapes = "default" if _device() == "cuda" else "smoke"
    ops = metafunc.module.OPS
    impls = [IMPLS[name] for name in config.getoption("impl")]
    params, ids = [], []
    for case in case_set(shapes):
        if case.op not in ops or case.dtype not in config.getoption("dtype"):
            continue
        for direction in case.directions:
            if direction not in config.getoption("direction"):
                continue
            for impl in impls:
                if impl.applies(case, _device()):
                    params.append((impl, case, direction))
                    ids.append(f"{impl.name}-{case.bench_id(direction)}")
    metafunc.parametrize("bench_item", params, ids=ids)


@pytest.fixture(scope="session")
def bench_device() -> str:
    return _device()


@pytest.fixture(scope="session")
def timing_config(request, bench_device) -> TimingConfig:
    flush = not request.config.getoption("no_flush_l2")
    config = TimingConfig(flush_l2=flush) if bench_device == "cuda" else TimingConfig.for_cpu()
    budget = request.config.getoption("bench_budget")
    return config if budget is None else type(config)(**{**vars(config), "budget_s": budget})


@pytest.fixture(scope="session")
def machine() -> dict:
    return _machine()


_MACHINE: dict = {}


def _machine() -> dict:
    if not _MACHINE:
        _MACHINE.update(perf_device.machine_info())
    return _MACHINE


def pytest_benchmark_update_machine_info(config, machine_info):
    info = dict(_machine())
    brand = (machine_info.get("cpu") or {}).get("brand_raw")
    if not torch.cuda.is_available() and brand:
        # Name the CPU as pytest-benchmark does, so the slug matches the gate's fallback.
        info.update(device=brand, device_slug=perf_device.device_slug(brand, is_gpu=False))
    machine_info["fastattn"] = info


def pytest_benchmark_update_commit_info(config, commit_info):
    # $FASTATTN_COMMIT names the tree that ran where git cannot (a lent GPU machine's copy has
    # no .git, or a stale one): it overrides what pytest-benchmark read from git, "dirty" with
    # it. The gate and the report read commit_info.id first.
    if os.environ.get("FASTATTN_COMMIT"):
        commit_info["id"] = os.environ["FASTATTN_COMMIT"]
        commit_info["dirty"] = False
    elif commit_info.get("id") in (None, "", "unknown"):
        commit = _machine()["commit"]
        if commit != "unknown":
            commit_info["id"] = commit
