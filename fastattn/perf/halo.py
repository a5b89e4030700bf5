"""`python -m fastattn.perf halo-model`: predicted cost of fastattn.distributed.local_attention.

A model, not a measurement: per rank and step, the bytes its halo exchange moves (forward:
keys and values in; backward: their gradients back) against the time of the compute that
hides them, and the weak-scaling efficiency that follows. Rates are inputs (defaults: the
H200 figures docs/distributed.md names); the transfers and pairs come from the same halo plan
the implementation runs (fastattn.distributed._plan), so the model follows the code.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from fastattn.distributed._plan import halo_plan
from fastattn.perf.flops import BWD_FACTOR, ELEMENT_BYTES

# Today's measured fastattn rates on one H200, bf16, D = 128 sliding window (README).
FWD_TFLOPS = 500.0
FWD_BWD_TFLOPS = 350.0
# Links, per GPU and direction: NVLink within a node, a 400 Gb/s NIC between nodes.
NVLINK_GBPS = 450.0
NETWORK_GBPS = 50.0
GPUS_PER_NODE = 8
# Assumptions, to be replaced by measurements: memory bandwidth that eager elementwise kernels
# reach (of the H200's 4800 GB/s), the latency of one P2P round and one step of NCCL's ring
# all_gather, and the host sync that the agreement's .cpu() costs.
ELEMENTWISE_GBPS = 3000.0
P2P_LATENCY_US = {"NVLink": 15.0, "network": 25.0}
RING_STEP_US = {"NVLink": 5.0, "network": 10.0}
HOST_SYNC_US = 20.0
# Bytes of device memory per element that the eager PyTorch steps move: the lse merge of an
# edge row (fp32 copies, four products/sums, the cast back), packing one k/v row for a send
# (stack, then the transposing copy), one float32 accumulation of a gradient row (add_rows).
MERGE_BYTES = 66
PACK_BYTES = 8
ADD_BYTES = 34
AGREE_BYTES_PER_RANK = 26 * 8  # the description each rank contributes to the all_gather


@dataclass(frozen=True)
class Shape:
    batch: int
    heads: int
    shard: int  # L_r, the same on every rank
    head_dim: int
    window: tuple[int, int]
    dtype: str = "bf16"

    @property
    def row_elements(self) -> int:
        """Elements of one sequence position of k (or v): B x H x D."""
        return self.batch * self.heads * self.head_dim


def _pairs(queries: range, total: int, window: tuple[int, int]) -> int:
    left, right = window
    return sum(min(i + right, total - 1) - max(i - left, 0) + 1 for i in queries)


def _link(rank: int, plan) -> str:
    pieces = (*plan.left_halo, *plan.right_halo, *plan.sends)
    crosses = any(p.src // GPUS_PER_NODE != p.dst // GPUS_PER_NODE for p in pieces)
    return "network" if crosses else "NVLink"


def _worst_rank(gpus: int) -> int:
    """A rank with neighbours on both sides whose left neighbour is on another node, if any."""
    return GPUS_PER_NODE if gpus > GPUS_PER_NODE else gpus // 2


@dataclass(frozen=True)
class Prediction:
    gpus: int
    link: str
    bytes_in: int  # per direction of the exchange; the backward moves the same bytes back
    bytes_out: int
    comm_us: float
    interior_us: dict  # direction -> us
    total_us: dict
    single_us: dict
    agree_us: float

    def efficiency(self, direction: str) -> float:
        """Tokens per second per GPU, relative to one GPU running one shard's sequence."""
        return self.single_us[direction] / self.total_us[direction]


def predict(shape: Shape, gpus: int) -> Prediction:
    rank = _worst_rank(gpus)
    plan = halo_plan([shape.shard] * gpus, rank, *shape.window)
    element = ELEMENT_BYTES[shape.dtype]
    row_bytes = 2 * shape.row_elements * element  # keys and values
    rows_in = plan.left_size + plan.right_size
    rows_out = sum(p.size for p in plan.sends)
    link = _link(rank, plan) if gpus > 1 else "NVLink"
    bandwidth = NETWORK_GBPS if link == "network" else NVLINK_GBPS
    comm_us = (P2P_LATENCY_US[link] + max(rows_in, rows_out) * row_bytes / bandwidth / 1e3
               if rows_in or rows_out else 0.0)

    flops_per_pair = 4.0 * shape.head_dim * shape.heads * shape.batch
    interior = _pairs(range(shape.shard), shape.shard, shape.window) * flops_per_pair
    start = plan.start
    total = _pairs(range(start, start + shape.shard), gpus * shape.shard, shape.window)
    edge = total * flops_per_pair - interior

    def seconds_us(flops, direction):
        fwd = flops / FWD_TFLOPS / 1e6
        if direction == "fwd":
            return fwd
        return flops * (1 + BWD_FACTOR) / FWD_BWD_TFLOPS / 1e6 - fwd  # the backward's share

    left, right = shape.window
    edge_rows = min(left, shape.shard) * bool(plan.left_halo) + min(right, shape.shard) * bool(plan.right_halo)
    to_us = shape.row_elements / ELEMENTWISE_GBPS / 1e3
    fwd_extra = (edge_rows * MERGE_BYTES + 2 * rows_out * PACK_BYTES) * to_us
    bwd_extra = (2 * rows_in * PACK_BYTES + edge_rows * ADD_BYTES + 2 * rows_out * ADD_BYTES) * to_us
    ring = "network" if gpus > GPUS_PER_NODE else "NVLink"
    agree_us = (gpus - 1) * RING_STEP_US[ring] + HOST_SYNC_US if gpus > 1 else 0.0

    fwd_us = agree_us + max(comm_us, seconds_us(interior, "fwd")) + seconds_us(edge, "fwd") + fwd_extra
    bwd_us = max(comm_us, seconds_us(interior, "bwd")) + seconds_us(edge, "bwd") + bwd_extra
    single = _pairs(range(shape.shard), shape.shard, shape.window) * flops_per_pair
    single_us = {"fwd": seconds_us(single, "fwd"),
                 "fwd+bwd": seconds_us(single, "fwd") + seconds_us(single, "bwd")}
    return Prediction(gpus, link, rows_in * row_bytes, rows_out * row_bytes, comm_us,
                      {"fwd": seconds_us(interior, "fwd"), "bwd": seconds_us(interior, "bwd")},
                      {"fwd": fwd_us, "fwd+bwd": fwd_us + bwd_us}, single_us, agree_us)


def table(shape: Shape, gpu_counts) -> str:
    lines = [
        "| GPUs | worst rank's link | halo in / out per rank, fwd (= bwd) | exchange | interior fwd "
        "| agreement | predicted fwd | predicted fwd+bwd | efficiency fwd | efficiency fwd+bwd |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for gpus in gpu_counts:
        p = predict(shape, gpus)
        lines.append(
            f"| {gpus} | {p.link if gpus > 1 else '-'} | {p.bytes_in / 1e6:.1f} / "
            f"{p.bytes_out / 1e6:.1f} MB | {p.comm_us:.0f} µs | {p.interior_us['fwd'] / 1e3:.2f} ms "
            f"| {p.agree_us:.0f} µs | {p.total_us['fwd'] / 1e3:.2f} ms "
            f"| {p.total_us['fwd+bwd'] / 1e3:.2f} ms | {p.efficiency('fwd'):.0%} "
            f"| {p.efficiency('fwd+bwd'):.0%} |")
    return "\n".join(lines)


def add_shape_arguments(p) -> None:
    """The per-GPU shape options, shared with the benchmark (fastattn.perf.scaling); the
    defaults are the acceptance case of issue 15."""
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--shard", type=int, default=65536, help="sequence positions per GPU")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--window", type=int, nargs=2, default=[4096, 0], metavar=("LEFT", "RIGHT"))
    p.add_argument("--dtype", choices=sorted(ELEMENT_BYTES), default="bf16")


def shape_of(args) -> Shape:
    return Shape(args.batch, args.heads, args.shard, args.head_dim, tuple(args.window), args.dtype)


def main(args) -> int:
    shape = shape_of(args)
    print(f"Shape per GPU (B, H, L_r, D) = ({shape.batch}, {shape.heads}, {shape.shard}, "
          f"{shape.head_dim}), window {shape.window}, {shape.dtype}; one GPU runs one shard's "
          f"sequence alone in {predict(shape, 1).single_us['fwd'] / 1e3:.2f} ms fwd, "
          f"{predict(shape, 1).single_us['fwd+bwd'] / 1e3:.2f} ms fwd+bwd.\n")
    print(table(shape, args.gpus))
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("halo-model", help="predicted cost of distributed local attention",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(p)
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 8, 64, 512])
    p.set_defaults(func=main)
