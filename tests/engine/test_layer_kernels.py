"""The fused Triton decoder layer (dflash/layer_kernels.py) against the unfused layer math.

Runs on CUDA, or on CPU under Triton's interpreter (``TRITON_INTERPRET=1 pytest ...``);
skipped where Triton is missing (the CPU wheels of torch used in CI)."""
import os

import pytest
import torch

triton = pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

import dflash.engine.cuda.layer as lk  # noqa: E402
from dflash.engine.graphs import FusedLayer, post_attention, pre_attention  # noqa: E402
from dflash.model.toy import make_random_target  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float16  # the interpreter lacks bf16


@pytest.fixture
def small_configs(monkeypatch):
    """Tiny GEMM configs; split-K on the qkv and down projections to cover both reduce paths."""
    def cfg(n, k):  # o (128 x 128) and down (128 x 384) projections: 2 K splits
        return (16, 32, 2 if n == 128 else 1, 4, 2)
    monkeypatch.setattr(lk, "config_for", cfg)


def _reference_layer(fl, h, pos, lim, kc, vc, cos, sin, n_heads, n_kv, d, eps):
    q, k, v = pre_attention(h[None].float(), cos[pos][None, None].float(),
                            sin[pos][None, None].float(), fl.ln1.float(), fl.wqkv.float(), None,
                            fl.qn.float(), fl.kn.float(), sizes=fl.sizes, n_heads=n_heads,
                            n_kv=n_kv, head_dim=d, eps=eps)
    kc = kc.float().index_copy(2, pos, k)
    vc = vc.float().index_copy(2, pos, v)
    slots = torch.arange(kc.shape[2], device=h.device)
    mask = (slots[None, :] <= lim[:, None])[None, None]
    out = torch.nn.functional.scaled_dot_product_attention(q, kc, vc, attn_mask=mask,
                                                           enable_gqa=True)
    out = out.transpose(1, 2).reshape(1, len(pos), -1)
    h = post_attention(h[None].float(), out, fl.wo.float(), fl.ln2.float(), fl.wgu.float(),
                       fl.wd.float(), eps=eps, gu_chunk=fl.gu_chunk)
    return h[0], kc, vc


@pytest.mark.parametrize("t", [1, 5, 16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("start", [40, 120])  # 120: the new tokens straddle two 128-slot chunks
def test_fused_layer_matches_unfused_math(small_configs, t, causal, start):
    model = make_random_target(hidden_size=128, num_heads=2, num_kv_heads=1, num_layers=1,
                               dtype=DTYPE).to(DEVICE)
    model.config.head_dim = 64
    layer = model.model.layers[0]
    n_heads, n_kv, d, eps = 2, 1, 64, 1e-6
    fl = FusedLayer(layer, n_heads, n_kv, d)
    if not fl.gu_chunk:  # CPU weights: interleave as FusedLayer does on CUDA (BLOCK_N 16)
        fl.gu_chunk = 8
        fl.wgu = lk.interleave_gate_up(fl.wgu, 8)
    cap = 300
    torch.manual_seed(0)
    h = torch.randn(t, 128, device=DEVICE).to(DTYPE)
    kc = torch.randn(1, n_kv, cap, d, device=DEVICE).to(DTYPE)
    vc = torch.randn(1, n_kv, cap, d, device=DEVICE).to(DTYPE)
    pos = torch.arange(start, start + t, device=DEVICE)
    lim = pos if causal else pos[-1:].expand(t).contiguous()
    rot = model.model.rotary_emb
    cos, sin = rot(torch.zeros(1, device=DEVICE, dtype=DTYPE),
                   torch.arange(cap, device=DEVICE)[None])
    cos, sin = cos[0].contiguous(), sin[0].contiguous()
    ref_h, ref_k, ref_v = _reference_layer(fl, h, pos, lim, kc, vc, cos, sin, n_heads, n_kv, d,
                                           eps)
    _, x1 = lk.residual_norm(h, None, fl.ln1, eps)
    out, _ = lk.fused_layer(h, x1, fl, fl.ln1, pos, lim, kc, vc, cos, sin, n_heads=n_heads,
                            n_kv=n_kv, head_dim=d, eps=eps)
    torch.testing.assert_close(kc.float(), ref_k, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(vc.float(), ref_v, atol=2e-2, rtol=2e-2)  # bf16 rounding of v
    torch.testing.assert_close(out.float(), ref_h, atol=5e-2, rtol=5e-2)


def test_interleaved_gate_up_matches_chunked():
    w = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3)  # gate rows 0-3, up rows 4-7
    inter = lk.interleave_gate_up(w, 2)
    assert inter[:, 0].tolist() == [0, 3, 12, 15, 6, 9, 18, 21]


@pytest.mark.skipif(DEVICE != "cuda", reason="the interpreter's numpy matmul is not row-invariant")
def test_rows_do_not_depend_on_the_block(small_configs):
    """A token's GEMM + residual/norm output is bitwise the same alone (AR step) and inside a
    block of 16.

    Bitwise by construction: the same Triton kernel reduces each row in a fixed order that
    does not depend on the row count (CUDA only; no BLAS involved)."""
    torch.manual_seed(1)
    a = torch.randn(16, 384, device=DEVICE).to(DTYPE)
    w = (torch.randn(128, 384, device=DEVICE) * 0.1).to(DTYPE)
    res = torch.randn(16, 128, device=DEVICE).to(DTYPE)
    g = torch.rand(128, device=DEVICE).to(DTYPE)
    part = lk._gemm(a, w, partial=True)
    h, x = lk.residual_norm(res, part, g, 1e-6)
    for i in (0, 7, 15):
        part1 = lk._gemm(a[i:i + 1].contiguous(), w, partial=True)
        assert torch.equal(part1[:, 0], part[:, i])
        h1, x1 = lk.residual_norm(res[i:i + 1].contiguous(), part1, g, 1e-6)
        assert torch.equal(h1[0], h[i]) and torch.equal(x1[0], x[i])


@pytest.mark.skipif(DEVICE != "cuda", reason="engine graphs need CUDA")
def test_engine_with_layer_kernels_is_greedy_lossless(monkeypatch):
    """Fast engine (layer kernels in the graphs) vs the unfused fast engine and vs AR."""
    from dflash.decoding.loop import SpeculativeDecoder
    from dflash.model.toy import make_random_draft

    target = make_random_target(vocab_size=512, hidden_size=256, num_heads=4, num_kv_heads=2,
                                num_layers=4, dtype=torch.bfloat16).to(DEVICE)
    target.config.head_dim = 64
    draft = make_random_draft(target, num_layers=2, dtype=torch.bfloat16).to(DEVICE)
    ids = torch.randint(0, 500, (1, 24), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
    from tests.decoding.test_truncation import Cycling

    outs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("DFLASH_LAYER_KERNELS", flag)
        dec = SpeculativeDecoder(target, draft, engine="fast")
        ar = dec.generate(ids, 48, block_size=1).output_ids
        spec = dec.generate(ids, 48, block_size=8).output_ids
        outs[flag] = (ar, spec)
        if flag == "1":  # sizes changing every cycle, drafted at 16 and truncated
            mixed = dec.generate(ids, 48, policy=Cycling([8, 12, 3, 16]), draft_block_size=16)
            assert mixed.output_ids == ar
    assert outs["1"][0] == outs["1"][1]  # row-invariant kernels: speculative == AR, bitwise
    # Different kernels round differently; on random weights the greedy paths agree early on.
    assert outs["1"][0][:8] == outs["0"][0][:8]


@pytest.mark.parametrize("window", [None, 8, 100])
@pytest.mark.parametrize("t", [1, 7])
def test_decode_attention_window_matches_masked_sdpa(window, t):
    """decode_attention with a sliding window (issue 21) against SDPA under the same mask:
    each query sees slots lim - window < s <= lim; lim straddles chunk boundaries."""
    from dflash.engine.cuda.kernels import decode_attention

    torch.manual_seed(2)
    cap, hkv, g, d = 300, 2, 2, 64
    q = torch.randn(1, hkv * g, t, d, device=DEVICE).to(DTYPE)
    kc = torch.randn(1, hkv, cap, d, device=DEVICE).to(DTYPE)
    vc = torch.randn(1, hkv, cap, d, device=DEVICE).to(DTYPE)
    for start in (3, 125, 250):
        lim = torch.arange(start, start + t, device=DEVICE)
        out = decode_attention(q, kc, vc, lim, window=window)
        slots = torch.arange(cap, device=DEVICE)
        mask = slots[None, :] <= lim[:, None]
        if window:
            mask &= slots[None, :] > lim[:, None] - window
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.float(), kc.float(), vc.float(), attn_mask=mask[None, None], enable_gqa=True)
        ref = ref.transpose(1, 2).reshape(1, t, -1)
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
