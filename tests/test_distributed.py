"""fastattn.distributed.local_attention against the single-process op on the concatenated
sequence: out, lse and dq/dk/dv of every rank's shard under the accuracy rule of
tests/tolerance.py, for 2, 3 and 4 gloo processes on CPU; and bad shards raising on every rank.

Each world size is one spawn (a module-scoped fixture) that runs all its cases; each case is
then its own test here. A spawn that outlives its deadline is killed and fails the tests; a
rank that dies of a signal after recording every case (an abort in the group's teardown,
distributed_cases.run_world) is judged on what it recorded, with a warning.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fastattn.distributed._plan import halo_plan
from tests.distributed_cases import CASES, run_world

_PARAMS = [pytest.param(world, case.name, id=f"w{world}-{case.name}")
           for world, cases in CASES.items() for case in cases]


@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory):
    # Load once here as the children will (the prebuilt library of an installed wheel, else
    # the JIT build, compiled now rather than by W racing children whose compile would outlast
    # the group's timeout), in a fresh process with the environment the children get.
    subprocess.run([sys.executable, "-c", "from fastattn import _ops; _ops.load()"], check=True)
    cache = {}

    def results(world):
        if world not in cache:
            try:
                cache[world] = run_world(world, str(tmp_path_factory.mktemp(f"gloo{world}")))
            except Exception as error:  # noqa: BLE001 - every case of this world fails with it
                cache[world] = error
        if isinstance(cache[world], Exception):
            raise cache[world]
        return cache[world]

    return results


@pytest.mark.parametrize("world, case", _PARAMS)
def test_gloo(world, case, gloo_results):
    for rank, result in enumerate(gloo_results(world)):
        assert result.get(case) == "ok", f"rank {rank} of {world}: {result.get(case, 'did not run')}"


def _brute_force_halos(lengths, rank, left, right):
    """Every key a shard's queries need from others, as {owner: [global positions]}."""
    starts = [sum(lengths[:r]) for r in range(len(lengths))]
    lo, hi, total = starts[rank], starts[rank] + lengths[rank], sum(lengths)
    needed = set()
    for i in range(lo, hi):
        needed |= {j for j in range(max(0, i - left), min(total, i + right + 1)) if not lo <= j < hi}
    owners = {}
    for j in sorted(needed):
        owner = max(r for r in range(len(lengths)) if starts[r] <= j < starts[r] + lengths[r])
        owners.setdefault(owner, []).append(j)
    return owners


@pytest.mark.parametrize("seed", range(40))
def test_plan_sends_exactly_the_keys_each_shard_needs(seed):
    gen = torch.Generator().manual_seed(seed)
    world = int(torch.randint(1, 7, (1,), generator=gen))
    lengths = torch.randint(0, 6, (world,), generator=gen).tolist()
    left, right = torch.randint(0, 14, (2,), generator=gen).tolist()
    plans = [halo_plan(lengths, r, left, right) for r in range(world)]
    for rank, plan in enumerate(plans):
        received = {}
        for piece in (*plan.left_halo, *plan.right_halo):
            assert piece.dst == rank
            received.setdefault(piece.src, []).extend(range(piece.lo, piece.hi))
        assert received == _brute_force_halos(lengths, rank, left, right), (lengths, left, right)
        # What a rank receives from src is exactly what src's plan sends it.
        for piece in (*plan.left_halo, *plan.right_halo):
            assert piece in plans[piece.src].sends
    assert sum(len(p.sends) for p in plans) == sum(
        len(p.left_halo) + len(p.right_halo) for p in plans)


def test_plan_reaches_as_many_hops_as_the_window_needs():
    plan = halo_plan([4, 4, 4, 4, 4], 4, 9, 0)  # keys [7, 16) from ranks 3, 2 and 1
    assert [(p.src, p.lo, p.hi) for p in plan.left_halo] == [(1, 7, 8), (2, 8, 12), (3, 12, 16)]
    assert plan.hops == 3 and plan.right_halo == ()


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 or more CUDA GPUs (NCCL)")
@pytest.mark.parametrize("world", [2])
def test_nccl(world, tmp_path):
    results = run_world(world, str(tmp_path), backend="nccl")
    failures = {(rank, case.name): result.get(case.name, "did not run")
                for rank, result in enumerate(results) for case in CASES[world]
                if result.get(case.name) != "ok"}
    assert not failures, failures


def test_a_world_counts_as_recorded_only_when_every_rank_ran_every_case(tmp_path):
    # run_world judges a world whose rank died of a signal only in this state (teardown abort).
    from tests.distributed_cases import _recorded_results

    def write(rank, results):
        (tmp_path / f"rank{rank}.json").write_text(json.dumps(results))

    write(0, {"causal-w5": "ok", "complete": True})
    assert _recorded_results(2, str(tmp_path)) is None  # rank 1 wrote nothing
    write(1, {"causal-w5": "ok"})
    assert _recorded_results(2, str(tmp_path)) is None  # rank 1 stopped before the end
    write(1, {"causal-w5": "ok", "complete": True})
    assert [r["causal-w5"] for r in _recorded_results(2, str(tmp_path))] == ["ok", "ok"]
