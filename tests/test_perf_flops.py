"""The FLOP/byte model against brute-force mask counts, and the shared case table."""

import itertools
import json
import re
from pathlib import Path

import pytest
import torch

from fastattn.perf import flops
from fastattn.perf.cases import SETS, Case, case_set, drawn_lengths

BASELINES = Path(__file__).resolve().parents[1] / "bench" / "baselines"


def brute_pairs(seq_len, window, key_length=None):
    left, right = window
    i = torch.arange(seq_len).view(-1, 1)
    j = torch.arange(seq_len).view(1, -1)
    keys = seq_len if key_length is None else key_length
    return int(((j >= i - left) & (j <= i + right) & (j < keys)).sum())


@pytest.mark.parametrize("seq_len", [1, 2, 7, 64, 129])
def test_pairs_match_a_brute_force_mask_count(seq_len):
    windows = [(0, 0), (1, 0), (0, 1), (3, 5), (5, 3), (seq_len - 1, 0), (seq_len, seq_len),
               (10**6, 10**6), (2047, 0)]
    for window, key_length in itertools.product(windows, [None, 0, 1, seq_len // 2, seq_len, 10**6]):
        expected = brute_pairs(seq_len, window, key_length)
        assert flops.local_pairs(seq_len, window, key_length) == expected, (seq_len, window, key_length)


def test_flops_sum_key_lengths_per_batch_and_scale_by_direction():
    seq_len, window, lengths = 50, (4, 7), [0, 19, 50]
    pairs = sum(brute_pairs(seq_len, window, n) for n in lengths)
    fwd = flops.local_flops(3, 2, seq_len, 16, window, key_lengths=lengths)
    assert fwd == 4 * 16 * 2 * pairs
    assert flops.local_flops(3, 2, seq_len, 16, window, key_lengths=lengths, direction="bwd") == 2.5 * fwd
    assert flops.local_flops(3, 2, seq_len, 16, window, key_lengths=lengths,
                             direction="fwd+bwd") == 3.5 * fwd


def test_closed_form_at_lengths_no_mask_could_hold():
    seq_len, w = 2**30, 1000
    # Interior queries see 2w + 1 keys; the first and last w queries lose 1..w each.
    assert flops.local_pairs(seq_len, (w, w)) == seq_len * (2 * w + 1) - w * (w + 1)
    assert flops.local_pairs(seq_len, (w, 0)) == seq_len * (w + 1) - w * (w + 1) // 2


def test_clustered_flops_count_centroid_and_topk_pairs():
    assert flops.clustered_flops(2, 8, 4096, 64, 128) == 4 * 64 * 2 * 8 * 128 * 4096
    improved = flops.clustered_flops(2, 8, 4096, 64, 128, topk=32)
    assert improved == 4 * 64 * 2 * 8 * (128 * 4096 + 4096 * 32)


def test_bytes_read_inputs_and_write_outputs_once():
    case = next(c for c in case_set("default") if c.id == "local-bf16-B1H16L16384D64-w256x256")
    one = 1 * 16 * 16384 * 64 * 2
    assert flops.case_bytes(case, "fwd") == 4 * one
    assert flops.case_bytes(case, "fwd+bwd") == 12 * one
    assert flops.case_flops(case, "fwd") == 4 * 64 * 16 * brute_pairs(16384, (256, 256))


def test_default_set_is_issue_6s_table_and_issue_14s_cases():
    default = case_set("default")
    plain = [c for c in default if c.query_len is None and c.seq_lens is None]
    local = {(c.batch, c.heads, c.seq_len, c.head_dim, c.window, c.dtype)
             for c in plain if c.op == "local" and c.kv_heads is None}
    shapes = [(4, 16, 4096, 64, (128, 128)), (1, 16, 16384, 64, (256, 256)),
              (1, 16, 65536, 64, (256, 256)), (2, 16, 16384, 128, (512, 512)),
              (1, 16, 16384, 128, (2047, 0)), (1, 16, 32768, 128, (1024, 1023))]
    assert local == {s + ("bf16",) for s in shapes} | {s + ("fp32",) for s in shapes[:2]}
    clustered = {(c.op, c.batch, c.heads, c.seq_len, c.head_dim, c.clusters, c.dtype)
                 for c in default if c.op != "local"}
    assert clustered == {(op, *s, dtype) for op in ("clustered", "improved-clustered")
                         for s in [(2, 8, 4096, 64, 128), (1, 8, 16384, 64, 256)]
                         for dtype in ("fp32", "bf16")}
    gqa = {(c.batch, c.heads, c.kv_heads, c.seq_len, c.head_dim, c.window, c.dtype)
           for c in plain if c.kv_heads is not None}
    assert gqa == {(1, 32, kv, 16384, 128, (4096, 0), "bf16") for kv in (8, 1)}
    assert all(c.directions == ("fwd", "fwd+bwd") for c in plain)
    # Decode is inference: forward only. The packed batch trains too.
    (decode,) = [c for c in default if c.query_len is not None]
    assert (decode.shape, decode.kv_shape) == ((32, 32, 1, 128), (32, 8, 32768, 128))
    assert (decode.window, decode.dtype, decode.directions) == ((4096, 0), "bf16", ("fwd",))
    (varlen,) = [c for c in default if c.seq_lens is not None]
    assert len(varlen.seq_lens) == 8 and all(512 <= n <= 8192 for n in varlen.seq_lens)
    assert (varlen.heads, varlen.head_dim, varlen.window, varlen.dtype) == (16, 128, (1024, 0),
                                                                            "bf16")
    assert varlen.directions == ("fwd", "fwd+bwd")


def test_sets_have_unique_readable_ids_and_full_extends_default():
    for name in SETS:
        ids = [c.id for c in case_set(name)]
        assert len(ids) == len(set(ids))
    assert {c.id for c in case_set("default")} <= {c.id for c in case_set("full")}
    case = case_set("default")[1]
    assert case.id == "local-bf16-B1H16L16384D64-w256x256"
    assert case.bench_id("fwd") == "local-fwd-bf16-B1H16L16384D64-w256x256"
    # smoke runs every op on 2 CPU cores: keep it tiny.
    assert {c.op for c in case_set("smoke")} == {"local", "clustered", "improved-clustered"}
    assert all(c.batch * c.heads * c.seq_len <= 2048 for c in case_set("smoke"))


def test_case_inputs_are_random_not_zeros():
    case = case_set("smoke")[0]
    q, k, v = case.inputs("cpu", generator=torch.Generator().manual_seed(0))
    assert q.shape == case.shape and q.dtype == case.torch_dtype
    assert q.float().std() > 0.5
    assert not torch.equal(q, k)


GQA = Case("local", 1, 32, 16384, 128, "bf16", window=(4096, 0), kv_heads=8)


def test_gqa_ids_name_the_kv_heads_and_other_ids_are_unchanged():
    assert GQA.id == "local-bf16-B1H32KV8L16384D128-w4096x0"
    assert GQA.bench_id("fwd+bwd") == "local-fwd+bwd-bf16-B1H32KV8L16384D128-w4096x0"
    assert GQA.with_(kv_heads=1).id == "local-bf16-B1H32KV1L16384D128-w4096x0"
    assert GQA.with_(kv_heads=None).id == "local-bf16-B1H32L16384D128-w4096x0"
    ids = {c.id for c in case_set("full")}
    assert {"local-bf16-B4H16L4096D64-w128x128", "local-fp32-B1H16L16384D64-w256x256",
            "local-bf16-B1H16L16384D128-w2047x0", "improved-clustered-bf16-B1H8L16384D64-c256k32",
            "local-bf16-B1H32KV8L16384D128-w4096x0", "local-bf16-B1H32KV1L16384D128-w4096x0"} <= ids
    assert "local-fp32-B1H4KV2L256D32-w32x32" in {c.id for c in case_set("smoke")}


DECODE = Case("local", 32, 32, 32768, 128, "bf16", window=(4096, 0), kv_heads=8, query_len=1,
              directions=("fwd",))
VARLEN = Case("local", 1, 16, 6, 128, "bf16", window=(1024, 0), seq_lens=(1, 2, 3))


def test_kv_cache_and_packed_ids_name_their_fields_and_the_seeded_draw_is_pinned():
    assert DECODE.id == "local-bf16-B32H32KV8Lq1Lk32768D128-w4096x0"
    assert DECODE.bench_id("fwd") == "local-fwd-bf16-B32H32KV8Lq1Lk32768D128-w4096x0"
    assert VARLEN.id == "local-bf16-N3H16T6D128-w1024x0"
    assert DECODE.describe()["Lq"] == 1 and DECODE.describe()["L"] == 32768
    assert VARLEN.describe()["seq_lens"] == [1, 2, 3] and "Lq" not in VARLEN.describe()
    assert VARLEN.cu_seqlens == [0, 1, 3, 6]
    # The packed cases' lengths come from a seeded draw: pinned here, since the id (and every
    # saved baseline's key) depends on them.
    assert drawn_lengths(8, 512, 8192, 14) == (1387, 5557, 6267, 6698, 5853, 4830, 2534, 2732)
    ids = {c.id for c in case_set("default")}
    assert {DECODE.id, "local-bf16-N8H16T35858D128-w1024x0"} <= ids
    smoke = {c.id for c in case_set("smoke")}
    assert {"local-fp32-B2H4KV2Lq1Lk256D32-w64x0", "local-fp32-N3H2T228D32-w32x0"} <= smoke


@pytest.mark.parametrize(("changes", "message"), [
    ({"query_len": 32768}, "query_len=32768, seq_len=32768"),
    ({"query_len": 0}, "query_len=0, seq_len=32768"),
    ({"op": "clustered", "window": None, "clusters": 16, "kv_heads": None},
     "op='clustered', query_len=1"),
    ({"seq_lens": (16384, 16384)}, "takes seq_lens, not query_len"),
])
def test_query_len_must_differ_from_seq_len_and_belong_to_local_attention(changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        DECODE.with_(**changes)


@pytest.mark.parametrize(("changes", "message"), [
    ({"seq_len": 7}, "seq_lens=(1, 2, 3), batch=1, seq_len=7"),
    ({"batch": 2}, "batch=2"),
    ({"seq_lens": (0, 6)}, "seq_lens=(0, 6)"),
    ({"seq_lens": ()}, "seq_lens=()"),
])
def test_seq_lens_must_pack_into_one_batch_row_of_their_total(changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        VARLEN.with_(**changes)


def brute_kv_cache(query_len, seq_len, window, key_length=None):
    """(visible pairs, keys seen by some query) of one batch row, by an explicit mask."""
    left, right = window
    keys = seq_len if key_length is None else min(key_length, seq_len)
    offset = 0 if query_len == seq_len else keys - query_len
    position = torch.arange(query_len).view(-1, 1) + offset
    j = torch.arange(seq_len).view(1, -1)
    visible = (j >= position - left) & (j <= position + right) & (j < keys)
    return int(visible.sum()), int(visible.any(dim=0).sum())


@pytest.mark.parametrize("seq_len", [1, 5, 64, 130])
def test_kv_cache_pairs_and_keys_seen_match_a_brute_force_mask(seq_len):
    windows = [(0, 0), (3, 0), (2, 5), (seq_len, 0), (10**6, 10**6)]
    for query_len, window, key_length in itertools.product(
            [1, 2, seq_len - 1, seq_len, seq_len + 3], windows, [None, 0, seq_len // 2]):
        if query_len <= 0:
            continue
        pairs, seen = brute_kv_cache(query_len, seq_len, window, key_length)
        where = (query_len, seq_len, window, key_length)
        assert flops.local_pairs(seq_len, window, key_length, query_len) == pairs, where
        assert flops.local_keys_seen(seq_len, window, key_length, query_len) == seen, where


def test_decode_counts_one_query_row_and_reads_only_the_windows_keys():
    # One query at key position 32767 sees keys 28671..32767: 4097 pairs per (batch, head).
    assert flops.case_flops(DECODE, "fwd") == 4 * 128 * 32 * 32 * 4097
    q_bytes = 32 * 32 * 1 * 128 * 2
    kv_read = 2 * 32 * 8 * 4097 * 128 * 2  # k and v: the rows the window reaches, not 32768
    assert flops.case_bytes(DECODE, "fwd") == 2 * q_bytes + kv_read
    # Self-attention reads every key: the plain cases' bytes are as before.
    assert flops.local_keys_seen(16384, (256, 256)) == 16384


def test_a_packed_batch_counts_each_sequence_on_its_own():
    case = VARLEN.with_(seq_lens=(5, 130, 1), seq_len=136, window=(3, 1))
    pairs = sum(brute_kv_cache(n, n, (3, 1))[0] for n in (5, 130, 1))
    assert flops.case_flops(case, "fwd") == 4 * 128 * 16 * pairs
    assert flops.case_flops(case, "fwd+bwd") == 3.5 * flops.case_flops(case, "fwd")
    # Fewer pairs than one sequence of 136 rows: none across the boundaries.
    dense = case.with_(seq_lens=None)
    assert flops.case_flops(case, "fwd") < flops.case_flops(dense, "fwd")
    assert flops.case_bytes(case, "fwd+bwd") == flops.case_bytes(dense, "fwd+bwd")


@pytest.mark.parametrize("path", sorted(BASELINES.glob("*.json")), ids=lambda p: p.stem)
def test_every_saved_baseline_case_is_still_in_the_table_under_its_id(path):
    # Baselines are keyed by these ids: a renamed case would silently drop out of the gate.
    groups = {c.bench_id(d): c for c in case_set("full") for d in c.directions}
    for bench in json.loads(path.read_text())["benchmarks"]:
        assert bench["group"] in groups, bench["fullname"]
        assert groups[bench["group"]].id == bench["extra_info"]["case"]


@pytest.mark.parametrize(("changes", "message"), [
    ({"kv_heads": 3}, "heads=32, kv_heads=3"),
    ({"kv_heads": 0}, "heads=32, kv_heads=0"),
    ({"kv_heads": -8}, "heads=32, kv_heads=-8"),
    ({"kv_heads": 64}, "heads=32, kv_heads=64"),
    ({"op": "clustered", "window": None, "clusters": 16}, "op='clustered', kv_heads=8"),
])
def test_kv_heads_must_divide_heads_and_belong_to_local_attention(changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        GQA.with_(**changes)


def test_gqa_counts_the_same_flops_and_fewer_bytes_for_k_and_v():
    mha = GQA.with_(kv_heads=None)
    q_bytes = 1 * 32 * 16384 * 128 * 2
    for direction, (q_like, kv_like) in {"fwd": (2, 2), "bwd": (4, 4), "fwd+bwd": (6, 6)}.items():
        assert flops.case_flops(GQA, direction) == flops.case_flops(mha, direction)
        assert flops.case_bytes(GQA, direction) == q_like * q_bytes + kv_like * q_bytes // 4
        assert flops.case_bytes(GQA.with_(kv_heads=1), direction) == (
            q_like * q_bytes + kv_like * q_bytes // 32)
        assert flops.case_bytes(mha, direction) == (q_like + kv_like) * q_bytes
    assert GQA.describe()["H_kv"] == 8 and "H_kv" not in mha.describe()


def test_gqa_inputs_give_k_and_v_their_kv_heads():
    case = next(c for c in case_set("smoke") if c.kv_heads)
    q, k, v = case.inputs("cpu", generator=torch.Generator().manual_seed(0))
    assert q.shape == case.shape == (1, 4, 256, 32)
    assert k.shape == v.shape == case.kv_shape == (1, 2, 256, 32)
    assert case.group == 2 and GQA.group == 4 and GQA.with_(kv_heads=None).group == 1
