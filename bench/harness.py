"""One benchmark: skip if unavailable, check against the reference, time, record extra_info."""

from __future__ import annotations

import pytest
import torch

from fastattn.perf import timing
from fastattn.perf.flops import case_bytes, case_flops
from tests.local_cases import FLOORS
from tests.tolerance import GRAD_FACTOR, assert_close_to_reference

# The check compares batch 0, kv head 0 and query head 0 of the implementation's full-shape
# result with the references: heads and batches are independent, and a float64 reference of
# every head at L = 65536 would cost more than the benchmark. Under GQA it takes the first
# CHECKED_GROUP query heads of kv head 0's group, so that dk and dv are checked as the sum over
# query heads they are; the group's other heads get a zero upstream gradient (they add nothing
# to dk, dv of kv head 0), which keeps an MQA check at H = 32 as cheap as two heads. A packed
# batch is one (1, H, T, D) batch row: its check covers every sequence of those heads.
CHECKED_GROUP = 2


def _checked(case) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """(batch, head) slices of q / out and of k / v that the check compares."""
    return (slice(0, 1), slice(0, min(case.group, CHECKED_GROUP))), (slice(0, 1), slice(0, 1))


def check(impl, fn, case, direction, device) -> None:
    """Fresh random inputs, output and (for bwd directions) gradients against float64."""
    q_part, kv_part = _checked(case)
    checked_case = impl.check_case(case, heads=q_part[1].stop)
    if checked_case != case:
        case, fn = checked_case, impl.prepare(checked_case, device)
    parts = (q_part, kv_part, kv_part)
    generator = torch.Generator(device).manual_seed(20261126)
    grad = direction != "fwd"
    q, k, v = (t.requires_grad_(grad) for t in case.inputs(device, generator=generator))
    out, reference = impl.checked_call(fn, case, q, k, v)
    gold_in = [t.detach()[p].double().requires_grad_(grad) for t, p in zip((q, k, v), parts)]
    same_in = [t.detach()[p].clone().requires_grad_(grad) for t, p in zip((q, k, v), parts)]
    gold, same = reference(*gold_in), reference(*same_in)
    floor = FLOORS[case.torch_dtype]
    label = f"{impl.name} on {case.bench_id(direction)}"
    assert_close_to_reference(out[q_part], gold, same, floor=floor, name=f"{label}: out")
    if not grad:
        return
    upstream = torch.randn(out.shape, generator=generator, device=device)
    upstream[:, q_part[1].stop:case.group] = 0
    grads = torch.autograd.grad(out, (q, k, v), upstream.to(out.dtype))
    gold_grads = torch.autograd.grad(gold, gold_in, upstream[q_part].double())
    same_grads = torch.autograd.grad(same, same_in, upstream[q_part].to(same.dtype))
    checked = impl.grads_checked(case)
    for name, actual, part, gold_grad, same_grad in zip("qkv", grads, parts, gold_grads,
                                                        same_grads, strict=True):
        if name in checked:
            assert_close_to_reference(actual[part], gold_grad, same_grad, factor=GRAD_FACTOR,
                                      floor=floor, name=f"{label}: grad_{name}")


def make_call(fn, case, direction, device):
    """A no-argument call doing one ``direction`` of ``fn`` on fixed random inputs."""
    generator = torch.Generator(device).manual_seed(0)
    q, k, v = case.inputs(device, generator=generator)
    if direction == "fwd":
        return lambda: fn(q, k, v)
    leaves = tuple(t.requires_grad_() for t in (q, k, v))
    upstream = torch.randn(q.shape, generator=generator, device=device).to(q.dtype)
    if direction == "fwd+bwd":
        return lambda: torch.autograd.grad(fn(*leaves), leaves, upstream)
    out = fn(*leaves)  # bwd alone: one forward, then its backward replayed
    return lambda: torch.autograd.grad(out, leaves, upstream, retain_graph=True)


def record(case, direction, impl, median_s: float, machine: dict) -> dict:
    flops, nbytes = case_flops(case, direction), case_bytes(case, direction)
    tflops, gbps = flops / median_s / 1e12, nbytes / median_s / 1e9
    peak_tflops = (machine.get("peak_tflops") or {}).get(case.dtype)
    peak_gbps = machine.get("peak_gbps")
    info = {"impl": impl.name, **case.describe(), "direction": direction, "flops": flops,
            "tflops": tflops, "bytes": nbytes, "gbps": gbps,
            "pct_peak": 100 * tflops / peak_tflops if peak_tflops else None,
            "pct_peak_bw": 100 * gbps / peak_gbps if peak_gbps else None,
            "device": machine["device"]}
    note = impl.check_note(case)
    if note:
        info["check_note"] = note
    return info


def bench(benchmark, impl, case, direction, *, device, config, machine) -> None:
    reason = impl.missing(case, direction, device)
    if reason:
        pytest.skip(reason)
    benchmark.group = case.bench_id(direction)
    fn = impl.prepare(case, device)
    check(impl, fn, case, direction, device)
    call = make_call(fn, case, direction, device)
    if torch.device(device).type == "cuda":
        plan = timing.plan_gpu(call, config, no_graph_reason=impl.no_graph_reason,
                                   device=device)
    else:
        plan = timing.plan_cpu(call, config)
    timing.run(benchmark, plan)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info.update(record(case, direction, impl, benchmark.stats.stats.median,
                                           machine))
