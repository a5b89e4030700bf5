"""The CPU kernel is fused: no buffer of size L x L or L x window, forward or backward."""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Runs in a fresh process so that the peak resident size (ru_maxrss) belongs to this call.
SCRIPT = textwrap.dedent("""
    import resource, torch, fastattn
    from fastattn import _ops
    _ops.load()
    torch.manual_seed(0)
    L, W, H, D = 65536, 64, 2, 64
    q, k, v = (torch.randn(1, H, L, D).requires_grad_() for _ in range(3))
    fastattn.local_attention(q[:, :, :128], k[:, :, :128], v[:, :, :128], (W, W)).sum()  # warm
    grad = torch.randn(1, H, L, D)
    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    before = peak()
    out = fastattn.local_attention(q, k, v, (W, W))
    after_forward = peak()
    out.backward(grad)
    after_backward = peak()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    print(before, after_forward, after_backward)
""")


def test_long_sequence_needs_no_band_buffer():
    seq_len, window, heads, head_dim = 65536, 64, 2, 64
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                            cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr
    before, after_forward, after_backward = map(int, result.stdout.split())
    tensor = heads * seq_len * head_dim * 4  # one float32 (B, H, L, D) tensor
    band = heads * seq_len * (2 * window + 1) * 4  # what an L x window score buffer would take
    slack = 16 << 20
    # Forward allocates out + lse; backward grad_q/k/v + delta (+ fastattn's own temporaries).
    assert after_forward - before < tensor + slack < band
    assert after_backward - before < 4 * tensor + slack < 3 * tensor + band
