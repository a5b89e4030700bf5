"""The one collective before any transfer: every rank checks its inputs, then all ranks
all_gather a small description of them, so that each rank learns every shard's length (the
layout) and every rank raises the same error when any rank's input is bad.

Raising only on the bad rank would leave the others blocked in their next collective until
the group's timeout; after this gather every rank takes the same branch, so a bad shard costs
one small all_gather, never a hang. A rank that never calls at all still blocks the others
until the group's timeout (``init_process_group(timeout=...)``), as in any collective.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastattn import _ops
from fastattn._build import BuildError
from fastattn._validate import check_lengths, check_qkv, check_scale, check_window

_PREFIX = "fastattn.distributed.local_attention: "
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_DEVICE_TYPES = ("cpu", "cuda")
_UNKNOWN = -1
_OK, _VALUE_ERROR, _TYPE_ERROR, _BUILD_ERROR = 0, 1, 2, 3
_ERRORS = {_VALUE_ERROR: ValueError, _TYPE_ERROR: TypeError, _BUILD_ERROR: BuildError}
_DIMS = ("ndim", "B", "H", "L", "D", "dtype")
# One rank's description, in gather order; every value is an int or a float, exact in float64.
_FIELDS = ("status", *(f"{t}.{d}" for t in "qkv" for d in _DIMS), "device", "left", "right",
           "scale", "key_lengths", "key_lengths.crc", "needs_grad")


@dataclass(frozen=True)
class Agreed:
    """What every rank knows after the gather."""

    rank: int
    lengths: tuple[int, ...]
    left: int
    right: int
    scale: float
    key_lengths: torch.Tensor | None  # (B,) int32 on q's device


def _index(value, table) -> int:
    return table.index(value) if value in table else _UNKNOWN


def _tensor_fields(name: str, t) -> dict:
    if not isinstance(t, torch.Tensor):
        return {f"{name}.{d}": _UNKNOWN for d in _DIMS}
    dims = list(t.shape[:4]) + [_UNKNOWN] * (4 - min(4, t.dim()))
    fields = dict(zip((f"{name}.{d}" for d in _DIMS[1:5]), dims, strict=True))
    return {f"{name}.ndim": t.dim(), **fields, f"{name}.dtype": _index(t.dtype, _DTYPES)}


def _describe(q, k, v, status, checked) -> dict:
    fields = {"status": status}
    for name, t in zip("qkv", (q, k, v), strict=True):
        fields.update(_tensor_fields(name, t))
    fields["device"] = _index(q.device.type, _DEVICE_TYPES) if isinstance(q, torch.Tensor) else -1
    fields["left"], fields["right"] = checked.get("window", (_UNKNOWN, _UNKNOWN))
    fields["scale"] = checked.get("scale", _UNKNOWN)
    lengths = checked.get("key_lengths")
    # The global lengths must be the same tensor everywhere; a CRC of the values stands for
    # it, so the gather keeps one size whatever B is.
    fields["key_lengths"] = int(lengths is not None)
    fields["key_lengths.crc"] = (zlib.crc32(lengths.to("cpu", torch.int64).numpy().tobytes())
                                 if lengths is not None else 0)
    fields["needs_grad"] = int(torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in (q, k, v)))
    return fields


def _gather(fields: dict, group, world: int) -> list[dict]:
    # NCCL gathers CUDA tensors only; the other backends take CPU ones.
    device = (torch.device("cuda", torch.cuda.current_device())
              if dist.get_backend(group) == "nccl" else torch.device("cpu"))
    mine = torch.tensor([float(fields[f]) for f in _FIELDS], dtype=torch.float64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine, group=group)
    return [dict(zip(_FIELDS, t.cpu().tolist(), strict=True)) for t in everyone]


def _tensor_text(row: dict, name: str) -> str:
    ndim = int(row[f"{name}.ndim"])
    if ndim == _UNKNOWN:
        return f"{name}=<not a tensor>"
    dims = [str(int(row[f"{name}.{d}"])) for d in _DIMS[1:1 + min(ndim, 4)]]
    shape = "(" + ", ".join(dims + (["..."] if ndim > 4 else [])) + ("," if ndim == 1 else "") + ")"
    dtype = int(row[f"{name}.dtype"])
    return f"{name}.shape={shape} {_DTYPES[dtype] if dtype != _UNKNOWN else 'of another dtype'}"


def _rank_text(rows, rank: int) -> str:
    return f"rank {rank} has " + ", ".join(_tensor_text(rows[rank], n) for n in "qkv")


def _values_text(rows, ranks, fields) -> str:
    def value(x):
        return int(x) if float(x).is_integer() else x
    return "; ".join(f"rank {r}: " + ", ".join(f"{f}={value(rows[r][f])}" for f in fields)
                     for r in ranks)


# Shards may differ in L only; everything else must be the same on every rank.
_SAME_SHARD = tuple(f"{t}.{d}" for t in "qkv" for d in ("ndim", "B", "H", "D", "dtype")) + ("device",)
_CHECKS = (
    (_SAME_SHARD, "every rank's q, k, v must be (B, H, L_r, D) shards with the same B, H, D, "
                  "dtype and device type (only L_r may differ; k and v may have H_kv heads "
                  "dividing H, the same on every rank)"),
    (("left", "right"), "window must be the same on every rank"),
    (("scale",), "scale must be the same on every rank"),
    (("key_lengths", "key_lengths.crc"),
     "key_lengths (the global valid lengths) must be the same tensor on every rank"),
    (("needs_grad",), "either every rank or none must need gradients (the backward is "
                      "collective: each rank returns its halo's key gradients to their owners)"),
)


def _raise_if_any_failed(rows, rank: int, local_error) -> None:
    world = len(rows)
    failed = [r for r in range(world) if rows[r]["status"] != _OK]
    if not failed:
        return
    if local_error is not None:
        raise type(local_error)(f"{_PREFIX}{local_error} (on rank {rank} of {world}; every rank "
                                "of the group raises)") from local_error
    kind = _ERRORS[int(rows[failed[0]]["status"])]
    raise kind(f"{_PREFIX}the inputs of rank(s) {failed} of {world} are invalid (their own error "
               f"says why): {_rank_text(rows, failed[0])}")


def _raise_if_disagree(rows) -> None:
    for fields, what in _CHECKS:
        bad = [r for r in range(1, len(rows)) if any(rows[r][f] != rows[0][f] for f in fields)]
        if not bad:
            continue
        ranks = (0, *bad)
        if fields is _SAME_SHARD:
            detail = "; ".join(_rank_text(rows, r) for r in ranks)
            kind = TypeError if any(rows[r]["q.dtype"] != rows[0]["q.dtype"] for r in bad) else ValueError
        else:
            detail, kind = _values_text(rows, ranks, fields), ValueError
        raise kind(f"{_PREFIX}{what}, but rank(s) {bad} differ from rank 0: {detail}")


def agree(q, k, v, window, key_lengths, scale, group) -> Agreed:
    """Checks the inputs on every rank at once; returns the layout and the checked arguments."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{_PREFIX}torch.distributed is not initialized; call "
                           "torch.distributed.init_process_group first")
    group = group if group is not None else dist.group.WORLD
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError(f"{_PREFIX}this process is not a member of group; call it on the "
                         "group's ranks only")
    status, local_error, checked = _OK, None, {}
    try:
        check_qkv(q, k, v, grouped_kv=True)
        checked["window"] = check_window(window)
        checked["scale"] = check_scale(scale, q.shape[-1])
        checked["key_lengths"] = check_lengths(key_lengths, "key_lengths", q.shape[0], q.device)
        # A failed build, or a device no built kernel runs on, must fail every rank too.
        _ops.ensure_loaded(q.device)
    except (TypeError, ValueError, BuildError) as error:
        status = next(code for code, kind in _ERRORS.items() if isinstance(error, kind))
        local_error = error
    rows = _gather(_describe(q, k, v, status, checked), group, world)
    _raise_if_any_failed(rows, rank, local_error)
    _raise_if_disagree(rows)
    left, right = checked["window"]
    lengths = tuple(int(row["q.L"]) for row in rows)
    return Agreed(rank, lengths, left, right, checked["scale"], checked["key_lengths"])
