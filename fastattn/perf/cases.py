"""The one table of benchmark cases, shared by the benchmark suite and the tests.

A :class:`Case` is an op at one shape and dtype; a benchmark is a case in one direction
(``fwd``, ``bwd`` or ``fwd+bwd``) timed for one implementation. Named sets:

- ``smoke``: small shapes that run every code path on 2 CPU cores in well under 2 minutes;
- ``default``: the shapes of issue 6 and issue 14's cases: GQA / MQA, decode against a KV cache
  and a packed variable-length batch (what ``make bench`` times on a GPU);
- ``full``: ``default`` plus sweeps over sequence length, head dim and window width, and the
  window-width sweep of ``python -m fastattn.perf windows`` (:data:`WINDOW_WIDTHS`).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, replace

import torch

DIRECTIONS = ("fwd", "bwd", "fwd+bwd")
OPS = ("local", "clustered", "improved-clustered")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SETS = ("smoke", "default", "full")


@dataclass(frozen=True)
class Case:
    op: str
    batch: int
    heads: int
    seq_len: int
    head_dim: int
    dtype: str  # a key of DTYPES
    window: tuple[int, int] | None = None  # local: (left, right), inclusive
    clusters: int | None = None  # clustered ops
    topk: int = 32  # improved-clustered only
    directions: tuple[str, ...] = ("fwd", "fwd+bwd")
    kv_heads: int | None = None  # local GQA / MQA: the heads of k and v; None: heads
    # Local KV cache / decode: q has query_len rows, k and v seq_len (the cache); the queries are
    # the cache's last query_len positions (bottom-right). None: query_len = seq_len.
    query_len: int | None = None
    # Local packed variable-length batch: each sequence's length (its queries and keys), packed
    # end to end as FlashAttention's varlen (T, H, D); batch is 1 and seq_len the total T.
    seq_lens: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got op={self.op!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got dtype={self.dtype!r}")
        if (self.op == "local") != (self.window is not None):
            raise ValueError(f"a window is needed by local attention and only by it: {self}")
        if self.op != "local" and not self.clusters:
            raise ValueError(f"{self.op} needs clusters > 0, got clusters={self.clusters}")
        if self.kv_heads is not None:
            if self.op != "local":
                raise ValueError(f"kv_heads (GQA / MQA) is for local attention only, got "
                                 f"op={self.op!r}, kv_heads={self.kv_heads}")
            if self.kv_heads <= 0 or self.heads % self.kv_heads:
                raise ValueError(f"kv_heads must be positive and divide heads, got "
                                 f"heads={self.heads}, kv_heads={self.kv_heads}")
        self._check_kv_cache_and_varlen()
        bad = set(self.directions) - set(DIRECTIONS)
        if bad:
            raise ValueError(f"directions must be among {DIRECTIONS}, got {sorted(bad)}")

    def _check_kv_cache_and_varlen(self):
        if (self.query_len is not None or self.seq_lens is not None) and self.op != "local":
            raise ValueError(f"query_len and seq_lens are for local attention only, got "
                             f"op={self.op!r}, query_len={self.query_len}, "
                             f"seq_lens={self.seq_lens}")
        if self.query_len is not None and not 0 < self.query_len != self.seq_len:
            # query_len == seq_len is the plain case: one case, one id.
            raise ValueError(f"query_len must be positive and differ from seq_len (else leave it "
                             f"None), got query_len={self.query_len}, seq_len={self.seq_len}")
        if self.seq_lens is not None:
            if self.query_len is not None:
                raise ValueError(f"a packed batch takes seq_lens, not query_len, got "
                                 f"query_len={self.query_len}")
            if (not self.seq_lens or min(self.seq_lens) <= 0 or self.batch != 1
                    or self.seq_len != sum(self.seq_lens)):
                raise ValueError(f"seq_lens must be positive lengths packed as batch=1, "
                                 f"seq_len=their sum, got seq_lens={self.seq_lens}, "
                                 f"batch={self.batch}, seq_len={self.seq_len}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def plain(self) -> bool:
        """Neither a KV cache nor a packed batch: q, k, v of one length, (B, H, L, D) each, what
        the kernel probes in tools/ time (with or without GQA)."""
        return self.query_len is None and self.seq_lens is None

    @property
    def q_len(self) -> int:
        """Rows of q: query_len for a KV cache case, else seq_len."""
        return self.seq_len if self.query_len is None else self.query_len

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The shape of q (and out); a packed batch is (1, H, T, D)."""
        return (self.batch, self.heads, self.q_len, self.head_dim)

    @property
    def kv_shape(self) -> tuple[int, int, int, int]:
        """The shape of k and v: ``shape`` with kv_heads heads under GQA / MQA."""
        return (self.batch, self.kv_heads or self.heads, self.seq_len, self.head_dim)

    @property
    def cu_seqlens(self) -> list[int] | None:
        """A packed batch's sequence boundaries, [0, l0, l0 + l1, ..., T] (q and k alike)."""
        if self.seq_lens is None:
            return None
        return list(itertools.accumulate(self.seq_lens, initial=0))

    @property
    def group(self) -> int:
        """Query heads per k / v head: 1 without GQA, ``heads`` for MQA."""
        return self.heads // (self.kv_heads or self.heads)

    @property
    def _dims(self) -> str:
        """``B1H16L16384D64``; ``B1H32KV8L16384D128`` under GQA (KV: the heads of k and v);
        ``B32H32KV8Lq1Lk32768D128`` for a KV cache (Lq queries, Lk keys); ``N8H16T35858D128``
        for a packed batch (N sequences, T rows in all). The plain form is unchanged, so the
        ids of saved baselines are too."""
        kv = "" if self.kv_heads is None else f"KV{self.kv_heads}"
        heads, d = f"H{self.heads}{kv}", f"D{self.head_dim}"
        if self.seq_lens is not None:
            return f"N{len(self.seq_lens)}{heads}T{self.seq_len}{d}"
        if self.query_len is not None:
            return f"B{self.batch}{heads}Lq{self.query_len}Lk{self.seq_len}{d}"
        return f"B{self.batch}{heads}L{self.seq_len}{d}"

    @property
    def params(self) -> str:
        """The op-specific tail of the id: ``w256x256``, ``c128`` or ``c128k32``."""
        if self.op == "local":
            return f"w{self.window[0]}x{self.window[1]}"
        return f"c{self.clusters}" + (f"k{self.topk}" if self.op == "improved-clustered" else "")

    @property
    def id(self) -> str:
        """E.g. ``local-bf16-B1H16L16384D64-w256x256``."""
        return f"{self.op}-{self.dtype}-{self._dims}-{self.params}"

    def bench_id(self, direction: str) -> str:
        """The case in one direction, e.g. ``local-fwd-bf16-B1H16L16384D64-w256x256``.

        It is the pytest-benchmark group, so every implementation of it sits in one table.
        """
        return f"{self.op}-{direction}-{self.dtype}-{self._dims}-{self.params}"

    def describe(self) -> dict:
        """The case's parameters, as plain JSON values (for a benchmark's extra_info)."""
        info = {"op": self.op, "case": self.id, "B": self.batch, "H": self.heads,
                "L": self.seq_len, "D": self.head_dim, "dtype": self.dtype}
        if self.kv_heads is not None:
            info["H_kv"] = self.kv_heads
        if self.query_len is not None:
            info["Lq"] = self.query_len  # L stays the keys' length
        if self.seq_lens is not None:
            info["seq_lens"] = list(self.seq_lens)
        if self.op == "local":
            info["window"] = list(self.window)
        else:
            info["clusters"] = self.clusters
            if self.op == "improved-clustered":
                info["topk"] = self.topk
        return info

    def inputs(self, device, *, generator: torch.Generator | None = None):
        """Random normal q, k, v (never zeros: they hide unwritten outputs and time differently);
        k and v with kv_heads heads under GQA / MQA. A packed batch is stored as varlen users
        hold it, (T, H, D) contiguous, and handed out as a (1, H, T, D) view of that storage."""
        def one(shape):
            if self.seq_lens is not None:
                shape = (shape[2], shape[1], shape[3])
            t = torch.randn(shape, generator=generator, device=device,
                            dtype=torch.float32).to(self.torch_dtype)
            return t if self.seq_lens is None else t.transpose(0, 1).unsqueeze(0)

        return tuple(one(shape) for shape in (self.shape, self.kv_shape, self.kv_shape))

    def with_(self, **changes) -> Case:
        return replace(self, **changes)


def _local(b, h, length, d, window, dtype="bf16", directions=("fwd", "fwd+bwd"), kv_heads=None,
           query_len=None):
    return Case("local", b, h, length, d, dtype, window=tuple(window), directions=directions,
                kv_heads=kv_heads, query_len=query_len)


def drawn_lengths(count: int, shortest: int, longest: int, seed: int) -> tuple[int, ...]:
    """``count`` lengths drawn uniformly from [shortest, longest] by Python's seeded Mersenne
    Twister: the same on every machine and version, so a packed case and its id are stable."""
    rng = random.Random(seed)
    return tuple(rng.randint(shortest, longest) for _ in range(count))


def _varlen(h, d, window, seq_lens, dtype="bf16", directions=("fwd", "fwd+bwd")):
    return Case("local", 1, h, sum(seq_lens), d, dtype, window=tuple(window),
                directions=directions, seq_lens=tuple(seq_lens))


def _clustered(op, b, h, length, d, clusters, dtype, directions=("fwd", "fwd+bwd"), topk=32):
    return Case(op, b, h, length, d, dtype, clusters=clusters, topk=topk, directions=directions)


_DEFAULT_LOCAL = [
    (4, 16, 4096, 64, (128, 128)),
    (1, 16, 16384, 64, (256, 256)),
    (1, 16, 65536, 64, (256, 256)),
    (2, 16, 16384, 128, (512, 512)),
    (1, 16, 16384, 128, (2047, 0)),
    (1, 16, 32768, 128, (1024, 1023)),
]
# GQA (issue 14): Mistral's 32 query heads over 8 kv heads, and MQA (one kv head), bf16.
_DEFAULT_GQA = [((1, 32, 16384, 128, (4096, 0)), kv_heads) for kv_heads in (8, 1)]
_DEFAULT_CLUSTERED = [(2, 8, 4096, 64, 128), (1, 8, 16384, 64, 256)]
# Decode (issue 14): one new token per sequence of a batch of 32 against a 32768-token KV cache of
# 8 kv heads, Mistral's window; inference, so forward only.
_DEFAULT_DECODE = dict(b=32, h=32, length=32768, d=128, window=(4096, 0), kv_heads=8,
                       query_len=1, directions=("fwd",))
# Packed varlen (issue 14): 8 sequences of 512..8192 tokens (seed 14: 35858 rows in all).
_DEFAULT_VARLEN = dict(h=16, d=128, window=(1024, 0), seq_lens=drawn_lengths(8, 512, 8192, 14))


def _default() -> list[Case]:
    cases = [_local(*shape) for shape in _DEFAULT_LOCAL]
    cases += [_local(*shape, dtype="fp32") for shape in _DEFAULT_LOCAL[:2]]
    cases += [_local(*shape, kv_heads=kv_heads) for shape, kv_heads in _DEFAULT_GQA]
    cases += [_local(**_DEFAULT_DECODE), _varlen(**_DEFAULT_VARLEN)]
    for op in ("clustered", "improved-clustered"):
        for dtype in ("fp32", "bf16"):
            cases += [_clustered(op, *shape, dtype) for shape in _DEFAULT_CLUSTERED]
    return cases


def _smoke() -> list[Case]:
    return [
        _local(1, 2, 256, 32, (32, 32), dtype="fp32"),
        _local(1, 2, 256, 64, (64, 0), dtype="bf16", directions=("fwd", "bwd")),
        # GQA in float32 with a window fast-transformers can express: each CPU peer runs it or
        # says why not (fast-transformers has no GQA).
        _local(1, 4, 256, 32, (32, 32), dtype="fp32", kv_heads=2),
        # The default decode and packed cases in small: a KV cache of 256 keys with GQA, and
        # three sequences, one shorter than the window.
        _local(2, 4, 256, 32, (64, 0), dtype="fp32", kv_heads=2, query_len=1,
               directions=("fwd",)),
        _varlen(2, 32, (32, 0), drawn_lengths(3, 16, 128, 14), dtype="fp32"),
        _clustered("clustered", 1, 2, 256, 32, 16, "fp32"),
        _clustered("improved-clustered", 1, 2, 256, 32, 16, "fp32", topk=16),
    ]


def _sweeps() -> list[Case]:
    """One knob at a time around (1, 16, 16384, 64, (256, 256)) in bf16."""
    cases = [_local(1, 16, length, 64, (256, 256))
             for length in (1024, 2048, 4096, 8192, 32768, 131072)]
    cases += [_local(1, 16, 16384, d, (256, 256)) for d in (16, 32, 96, 128)]
    cases += [_local(1, 16, 16384, 64, (w, w)) for w in (16, 64, 128, 512, 1024, 2048)]
    cases += [_local(1, 16, 16384, 64, (w, 0)) for w in (255, 1023, 4095)]
    return [c.with_(directions=DIRECTIONS) for c in cases]


# Where each implementation wins as the window widens: causal sliding windows of these widths
# (keys a query sees: left = width - 1, right = 0, Mistral's form) at L = 32768, D = 128, bf16.
WINDOW_WIDTHS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)
WINDOW_SWEEP_SHAPE = (1, 16, 32768, 128)


def window_sweep() -> list[Case]:
    return [_local(*WINDOW_SWEEP_SHAPE, (width - 1, 0)) for width in WINDOW_WIDTHS]


def case_set(name: str) -> list[Case]:
    """The cases of a named set, without duplicates, in a stable order."""
    if name not in SETS:
        raise ValueError(f"case set must be one of {SETS}, got {name!r}")
    if name == "smoke":
        cases = _smoke()
    elif name == "default":
        cases = _default()
    else:
        cases = _default() + _sweeps() + window_sweep()
    seen, unique = set(), []
    for case in cases:
        if case.id not in seen:
            seen.add(case.id)
            unique.append(case)
    return unique
