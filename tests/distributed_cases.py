"""Cases and the per-process worker of the distributed local attention tests.

One spawn of W processes runs every case of its world size, so that process start-up (torch
import, extension load, group set-up) is paid once per world size, not per case. Each rank
records "ok" or the failure of every case in a JSON file that the parent test reads.
"""

from __future__ import annotations

import faulthandler
import json
import os
import re
import socket
import time
import traceback
import warnings
import zlib
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastattn.distributed
from fastattn.perf.scaling import measure
from fastattn.reference import local_attention_reference
from tests.local_cases import FLOORS
from tests.tolerance import GRAD_FACTOR, assert_close_to_reference

# A collective that waits longer than this on a missing peer raises instead of hanging.
GROUP_TIMEOUT_S = 60
BATCH, HEADS, HEAD_DIM = 2, 2, 16


@dataclass(frozen=True)
class Case:
    name: str
    lengths: tuple[int, ...]  # one shard length per rank
    window: tuple[int, int]
    dtype: torch.dtype = torch.float32
    key_lengths: tuple[int, ...] | None = None  # global, one per batch
    return_lse: bool = True
    layout: str = "bhld"  # "blhd": each shard a (B, H, L_r, D) view of (B, L_r, H, D) storage
    grad: bool = True  # False: called under torch.no_grad(), outputs only
    group_ranks: tuple[int, ...] | None = None  # a subgroup of these world ranks (else WORLD)
    heads: int = HEADS
    kv_heads: int | None = None  # GQA / MQA: k and v with this many heads (else heads)


@dataclass(frozen=True)
class BadCase:
    """A case where ``bad_rank`` passes a wrong argument and every rank must raise ``error``."""

    name: str
    lengths: tuple[int, ...]
    bad_rank: int
    mutate: str  # a key of _MUTATIONS
    error: type
    patterns: dict = field(default_factory=dict)  # rank -> regex its message must match


def _more_heads(call):
    for name in "qkv":
        call[name] = torch.cat((call[name], call[name][:, :1]), dim=1)


def _float64(call):
    for name in "qkv":
        call[name] = call[name].double()


def _short_k_head_dim(call):
    call["k"] = call["k"][..., :8]


def _kv_heads_not_dividing(call):
    for name in "kv":
        call[name] = torch.cat((call[name], call[name][:, :1]), dim=1)


def _q_not_a_tensor(call):
    call["q"] = call["q"].tolist()


def _other_window(call):
    call["window"] = (2, 3)


def _own_key_lengths(call):
    call["key_lengths"] = torch.tensor([5, 6], device=call["q"].device)


def _needs_grad(call):
    for name in "qkv":
        call[name].requires_grad_()


_MUTATIONS = {f.__name__.lstrip("_"): f for f in (
    _more_heads, _float64, _short_k_head_dim, _kv_heads_not_dividing, _q_not_a_tensor,
    _other_window, _own_key_lengths, _needs_grad)}


@dataclass(frozen=True)
class ScalingCase:
    """One tiny collective measurement of the weak-scaling benchmark (fastattn.perf.scaling)."""

    name: str


def _cases(world: int) -> list:
    if world == 2:
        n = (13, 19)
        return [
            Case("causal-w5", n, (5, 0)),
            Case("both-w4-bf16", n, (4, 4), torch.bfloat16),
            Case("anticausal-w6", n, (0, 6)),
            Case("wider-than-shard-w20x3", n, (20, 3), key_lengths=(20, 32)),
            Case("wider-than-L-w100x100", n, (100, 100)),
            Case("equal-shards-w3x7-fp16", (16, 16), (3, 7), torch.float16),
            Case("strided-blhd-w7x7", n, (7, 7), layout="blhd", key_lengths=(15, 30)),
            Case("gqa-4-over-2-w20x3", n, (20, 3), key_lengths=(20, 32), heads=4, kv_heads=2),
            Case("mqa-w6x6-bf16", n, (6, 6), torch.bfloat16, kv_heads=1),
            *_bad_cases(n),
            Case("after-errors-w6x2", n, (6, 2)),
            ScalingCase("scaling-benchmark-runs"),
        ]
    if world == 3:
        n = (9, 4, 12)  # rank 1's shard [9, 13) is shorter than most windows below
        return [
            Case("causal-w7-two-hops", n, (7, 0)),
            Case("both-w3-bf16-kl-mid", n, (3, 3), torch.bfloat16, key_lengths=(11, 25)),
            Case("anticausal-w10-two-hops", n, (0, 10), key_lengths=(25, 10)),
            Case("causal-wider-than-L-w30-kl-mid", n, (30, 0), key_lengths=(12, 0)),
            Case("no-lse-w2x5", n, (2, 5), return_lse=False),
            Case("no-grad-w6x1-bf16", n, (6, 1), torch.bfloat16, grad=False),
            Case("mqa-blhd-w10x2-two-hops", n, (10, 2), layout="blhd", key_lengths=(20, 7),
                 heads=3, kv_heads=1),
            *_bad_cases(n),
            Case("after-errors-w4x4-bf16", n, (4, 4), torch.bfloat16),
        ]
    if world == 4:
        n = (7, 3, 9, 5)
        return [
            Case("both-w5-kl-mid", n, (5, 5), key_lengths=(12, 24)),
            Case("causal-w11-bf16-hops", n, (11, 2), torch.bfloat16),
            Case("anticausal-w13-hops", n, (2, 13), key_lengths=(24, 17)),
            Case("empty-shard-w50x50", (6, 0, 9, 5), (50, 50), key_lengths=(8, 20)),
            Case("empty-shard-w4x0-bf16", (6, 0, 9, 5), (4, 0), torch.bfloat16),
            Case("no-halo-w0x0", n, (0, 0)),
            Case("subgroup-of-ranks-1-2-3-w6x4", (5, 8, 4), (6, 4), key_lengths=(10, 17),
                 group_ranks=(1, 2, 3)),
            *_bad_cases(n),
            Case("after-errors-w9x9", n, (9, 9)),
        ]
    raise ValueError(f"no cases for world={world}")


def _bad_cases(n):
    world = len(n)
    last, ranks = world - 1, range(world)
    every = r"every rank's q, k, v must be \(B, H, L_r, D\) shards with the same B, H, D, dtype"
    return [
        BadCase("error-heads-differ", n, 1, "more_heads", ValueError,
                {r: every + r".*rank\(s\) \[1\] differ from rank 0.*rank 1 has q.shape=\(2, 3, "
                 for r in ranks}),
        BadCase("error-dtype-differs", n, last, "float64", TypeError,
                {r: rf"rank\(s\) \[{last}\] differ.*torch.float64" for r in ranks}),
        BadCase("error-k-head-dim-on-rank-0", n, 0, "short_k_head_dim", ValueError,
                {0: r"k and v must have the same \(B, H_kv, L, D\) shape.*on rank 0 of",
                 **{r: r"the inputs of rank\(s\) \[0\] .* are invalid.*rank 0 has q.shape=\(2, 2, "
                    r".*k.shape=\(2, 2, \d+, 8\)" for r in ranks[1:]}}),
        BadCase("error-kv-heads-not-dividing", n, last, "kv_heads_not_dividing", ValueError,
                {**{r: rf"the inputs of rank\(s\) \[{last}\] .* are invalid.*rank {last} has "
                    r"q.shape=\(2, 2, .*k.shape=\(2, 3, " for r in ranks[:-1]},
                 last: r"q has H=2 heads, k and v have H_kv=3: H must be a multiple of H_kv.*"
                       rf"on rank {last} of"}),
        BadCase("error-q-not-a-tensor", n, last, "q_not_a_tensor", TypeError,
                {**{r: rf"inputs of rank\(s\) \[{last}\] .* invalid.*rank {last} has q=<not a "
                    r"tensor>" for r in ranks[:-1]},
                 last: r"q must be a torch.Tensor, got list"}),
        BadCase("error-window-differs", n, 1, "other_window", ValueError,
                {r: r"window must be the same on every rank, but rank\(s\) \[1\] differ from "
                    r"rank 0: rank 0: left=2, right=2; rank 1: left=2, right=3" for r in ranks}),
        BadCase("error-key-lengths-on-one-rank", n, last, "own_key_lengths", ValueError,
                {r: rf"key_lengths .* must be the same tensor on every rank, but rank\(s\) "
                    rf"\[{last}\] differ" for r in ranks}),
        BadCase("error-gradients-on-one-rank", n, 1, "needs_grad", ValueError,
                {r: r"either every rank or none must need gradients.*rank 1: needs_grad=1"
                 for r in ranks}),
    ]


CASES = {world: _cases(world) for world in (2, 3, 4)}


def _inputs(case, device):
    """The full sequence's tensors, identical on every rank (same seed)."""
    # Seeded by the name (not hash(), which differs per process): the same tensors on every rank.
    generator = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    total = sum(case.lengths)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    kv_heads = case.heads if case.kv_heads is None else case.kv_heads
    q, k, v = (randn(BATCH, heads, total, HEAD_DIM).to(case.dtype)
               for heads in (case.heads, kv_heads, kv_heads))
    grad_out = randn(BATCH, case.heads, total, HEAD_DIM)
    grad_lse = randn(BATCH, case.heads, total)
    key_lengths = None if case.key_lengths is None else torch.tensor(case.key_lengths)
    return [t.to(device) for t in (q, k, v, grad_out, grad_lse)], key_lengths


def _loss(out, lse, grad_out, grad_lse):
    loss = (out * grad_out.to(out.dtype)).sum()
    if lse is not None:
        # lse is -inf where a query sees no key; its gradient must not matter there.
        finite = torch.isfinite(lse)
        loss = loss + (lse[finite] * grad_lse.to(lse.dtype)[finite]).sum()
    return loss


def _reference(q, k, v, case, key_lengths, grad_out, grad_lse, as_dtype):
    leaves = [t.detach().to(as_dtype).requires_grad_() for t in (q, k, v)]
    out, lse = local_attention_reference(*leaves, case.window, key_lengths=key_lengths,
                                         return_lse=True)
    _loss(out, lse, grad_out, grad_lse).backward()
    return out.detach(), lse.detach(), [t.grad for t in leaves]


def _run_case(case: Case, rank: int, device):
    group = None
    if case.group_ranks is not None:
        group = dist.new_group(list(case.group_ranks))  # collective over the world
        if rank not in case.group_ranks:
            return
        rank = dist.get_rank(group)  # shards are in the group's rank order
    (q, k, v, grad_out, grad_lse), key_lengths = _inputs(case, device)
    gold_lse = local_attention_reference(q.double(), k.double(), v.double(), case.window,
                                         key_lengths=key_lengths, return_lse=True)[1]
    # Without return_lse the loss has no lse term: the references get a zero lse gradient.
    grad_lse = grad_lse.masked_fill(~torch.isfinite(gold_lse) | (not case.return_lse), 0)
    gold_out, gold_lse, gold_grads = _reference(q, k, v, case, key_lengths, grad_out, grad_lse,
                                                torch.float64)
    same_out, same_lse, same_grads = _reference(q, k, v, case, key_lengths, grad_out, grad_lse,
                                                q.dtype)
    lo = sum(case.lengths[:rank])
    hi = lo + case.lengths[rank]
    shard = [t[:, :, lo:hi].detach().clone() for t in (q, k, v)]
    if case.layout == "blhd":
        shard = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in shard]
    shard = [t.requires_grad_(case.grad) for t in shard]
    kl = None if key_lengths is None else key_lengths.to(device)
    with torch.set_grad_enabled(case.grad):
        result = fastattn.distributed.local_attention(*shard, case.window, group=group,
                                                      key_lengths=kl, return_lse=case.return_lse)
    out, lse = result if case.return_lse else (result, None)
    if case.grad:
        _loss(out, lse, grad_out[:, :, lo:hi], None if lse is None else grad_lse[:, :, lo:hi]
              ).backward()
    else:
        assert not out.requires_grad

    floor = FLOORS[case.dtype]
    assert_close_to_reference(out, gold_out[:, :, lo:hi], same_out[:, :, lo:hi], floor=floor,
                              name="out")
    if lse is not None:
        assert_close_to_reference(lse, gold_lse[:, :, lo:hi], same_lse[:, :, lo:hi].float(),
                                  floor=1e-5, name="lse")
    if not case.grad:
        return
    for name, leaf, gold, same in zip("qkv", shard, gold_grads, same_grads, strict=True):
        assert_close_to_reference(leaf.grad, gold[:, :, lo:hi], same[:, :, lo:hi],
                                  factor=GRAD_FACTOR, floor=floor, name=f"grad_{name}")


def _run_bad_case(case: BadCase, rank: int, device):
    total = sum(case.lengths)
    lo, hi = sum(case.lengths[:rank]), sum(case.lengths[:rank + 1])
    call = {name: torch.randn(BATCH, HEADS, total, HEAD_DIM, device=device)[:, :, lo:hi]
            for name in "qkv"}
    call.update(window=(2, 2), key_lengths=None)
    if rank == case.bad_rank:
        _MUTATIONS[case.mutate](call)
    try:
        fastattn.distributed.local_attention(call.pop("q"), call.pop("k"), call.pop("v"),
                                             call.pop("window"), **call)
    except case.error as error:
        pattern = case.patterns[rank]
        assert re.search(pattern, str(error)), f"message {str(error)!r} does not match {pattern!r}"
        return
    raise AssertionError(f"no {case.error.__name__} raised on rank {rank}")


def _run_scaling_case(case: ScalingCase, rank: int, device):
    seconds = measure(fastattn.distributed.local_attention, (1, 2, 40, 16), (4, 0),
                      torch.float32, "fwd+bwd", device, calls=1, rounds=1, warmup=0)
    assert 0 < seconds < GROUP_TIMEOUT_S, seconds


_RUNNERS = {Case: _run_case, BadCase: _run_bad_case, ScalingCase: _run_scaling_case}


def worker(rank: int, world: int, port: int, result_dir: str, backend: str) -> None:
    """One rank: joins the group, runs every case of its world size, writes rank<r>.json (with
    "complete" once every case has run), then waits for the other ranks and leaves the group."""
    faulthandler.enable()  # a rank that aborts prints where each of its threads stood
    torch.set_num_threads(1)  # W processes share the machine's few cores
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=GROUP_TIMEOUT_S))
    results = {}
    try:
        for case in CASES[world]:
            started = time.perf_counter()
            try:
                _RUNNERS[type(case)](case, rank, device)
                results[case.name] = "ok"
            except Exception:  # noqa: BLE001 - every failure is reported by the parent test
                results[case.name] = traceback.format_exc()
            results[f"{case.name}.seconds"] = time.perf_counter() - started
        results[_COMPLETE] = True
    finally:
        with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    # No rank tears the group down while a peer may still be talking to it.
    dist.barrier()
    dist.destroy_process_group()


_COMPLETE = "complete"  # the key a rank's results carry once every case has run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _recorded_results(world: int, result_dir: str) -> list[dict] | None:
    """Every rank's results if each rank recorded all its cases, else None."""
    results = []
    for rank in range(world):
        try:
            with open(os.path.join(result_dir, f"rank{rank}.json")) as f:
                results.append(json.load(f))
        except (OSError, ValueError):
            return None
    return results if all(r.get(_COMPLETE) for r in results) else None


def run_world(world: int, result_dir: str, backend: str = "gloo", deadline_s: float = 120.0):
    """Spawns ``world`` workers, waits at most ``deadline_s``, returns each rank's results.

    A rank that dies of a signal fails the run, unless every rank had recorded all its cases
    before: then the abort came in torch's teardown of the group (seen twice on CI's 2-core VM
    with gloo, "terminate called without an active exception" in one rank of two, never in 40
    runs elsewhere; pytorch issue 190489 is that message from a gloo group torn down with work
    in flight), the results are judged, and a warning says so."""
    context = mp.spawn(worker, args=(world, free_port(), result_dir, backend), nprocs=world,
                       join=False)
    deadline = time.monotonic() + deadline_s
    try:
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.terminate()
                raise TimeoutError(f"{world} ranks did not finish within {deadline_s} s (a hang?)")
    except mp.ProcessExitedException as error:
        results = _recorded_results(world, result_dir)
        if error.signal_name is None or results is None:
            raise
        warnings.warn(f"rank {error.error_index} of {world} died of {error.signal_name} after "
                      f"recording every case (in the process group's teardown); judging them")
        return results
    results = _recorded_results(world, result_dir)
    if results is None:
        raise RuntimeError(f"the {world} ranks exited without recording every case")
    return results
