"""The torch.library plumbing: opcheck, torch.compile, and the lse gradient path."""

import pytest
import torch

import fastattn
from fastattn import _ops
from tests.local_cases import make_qkv


# (H, H_kv): plain attention, GQA (groups of 2 query heads), MQA.
HEADS = [(2, 2), (4, 2), (3, 1)]


def _heads_id(heads):
    return f"H{heads[0]}-Hkv{heads[1]}"


# (Lq, softcap) of the calls: self-attention (Lq == Lk = 19), then the KV-cache case (Lq = 7)
# with softcap, which the CUDA kernels do not take yet (the API raises NotImplementedError).
VARIANTS = {"self": (19, None), "kvcache-softcap": (7, 1.5)}


def device_variants():
    """Every variant on the CPU; on CUDA self-attention only."""
    return [*(pytest.param("cpu", variant, id=f"cpu-{variant}") for variant in VARIANTS),
            pytest.param("cuda", "self", id="cuda-self", marks=pytest.mark.cuda)]


def _fwd_args(device, dtype=torch.float32, requires_grad=True, heads=(2, 2), variant="self"):
    q_len, softcap = VARIANTS[variant]
    q, k, v = make_qkv(2, heads[0], q_len, 16, dtype, device=device, kv_heads=heads[1],
                       kv_len=19)
    q, k, v = (t.requires_grad_(requires_grad) for t in (q, k, v))
    key_lengths = torch.tensor([19, 11], dtype=torch.int32, device=device)
    args = (q, k, v, 3, 4, key_lengths, 0.25)
    return args if softcap is None else (*args, softcap)


@pytest.mark.parametrize("heads", HEADS, ids=_heads_id)
@pytest.mark.parametrize("device, variant", device_variants())
def test_opcheck_forward(device, variant, heads):
    _ops.load()
    torch.library.opcheck(torch.ops.fastattn.local_attention_fwd.default,
                          _fwd_args(device, heads=heads, variant=variant))
    args = list(_fwd_args(device, heads=heads, variant=variant))
    args[5] = None
    torch.library.opcheck(torch.ops.fastattn.local_attention_fwd.default, tuple(args))


@pytest.mark.parametrize("heads", HEADS, ids=_heads_id)
@pytest.mark.parametrize("device, variant", device_variants())
def test_opcheck_backward(device, variant, heads):
    _ops.load()
    q, k, v, left, right, key_lengths, *scalars = _fwd_args(
        device, requires_grad=False, heads=heads, variant=variant)
    out, lse = torch.ops.fastattn.local_attention_fwd(q, k, v, left, right, key_lengths, *scalars)
    args = (torch.randn_like(out), torch.randn_like(lse), q, k, v, out, lse, left, right,
            key_lengths, *scalars)
    torch.library.opcheck(torch.ops.fastattn.local_attention_bwd.default, args)
    grad_q, grad_k, grad_v = torch.ops.fastattn.local_attention_bwd(*args)
    assert (grad_q.shape, grad_k.shape, grad_v.shape) == (q.shape, k.shape, v.shape)


@pytest.mark.parametrize("heads", HEADS, ids=_heads_id)
@pytest.mark.parametrize("device, variant", device_variants())
def test_compile_fullgraph_without_recompile(device, variant, heads):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.compiler.reset()
    counter = CompileCounterWithBackend("aot_eager")
    q_len, softcap = VARIANTS[variant]

    def step(q, k, v, key_lengths):
        out = fastattn.local_attention(q, k, v, (4, 2), key_lengths=key_lengths, softcap=softcap)
        return (out * out).sum()

    compiled = torch.compile(step, backend=counter, fullgraph=True)
    for _ in range(2):  # same shapes, fresh data: one compilation only
        q, k, v = (t.requires_grad_() for t in make_qkv(
            2, heads[0], q_len, 16, torch.float32, device=device, kv_heads=heads[1], kv_len=23))
        key_lengths = torch.tensor([23, 9], device=device)
        loss = compiled(q, k, v, key_lengths)
        loss.backward()
        expected_leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        expected = step(*expected_leaves, key_lengths)
        expected.backward()
        torch.testing.assert_close(loss, expected)
        for actual, eager in zip((q, k, v), expected_leaves, strict=True):
            torch.testing.assert_close(actual.grad, eager.grad)
    assert counter.frame_count == 1


def test_compile_with_inductor_on_cpu():
    torch.compiler.reset()
    q, k, v = make_qkv(1, 2, 40, 16, torch.float32)
    fn = torch.compile(lambda q, k, v: fastattn.local_attention(q, k, v, (5, 5)) * 2,
                       fullgraph=True)
    torch.testing.assert_close(fn(q, k, v), fastattn.local_attention(q, k, v, (5, 5)) * 2)
