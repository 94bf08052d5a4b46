"""Issue 23: Qwen3-MoE and GPT-OSS on the fast engine (engine/cuda/moe.py, attention sinks and
biases on the fused path).

CPU: the torch twin of the MoE kernels equals HF's MoE blocks; the fast engine's code path
(``_cpu_graph_mode``: fused math, whole-buffer steps, no real graphs) decodes greedily exactly
as ``target.generate`` with a briefly trained draft. CUDA only: the Triton MoE kernels
against the twin, their row invariance (a token alone == the same token in a block of 16,
bitwise), decode_attention with sinks against the eager sink attention, and the fast engine
with real graphs: speculative == AR token for token (bf16), == target.generate (float32).
"""
import pytest
import torch

from families import family_case, family_prompts, greedy_reference, make_family_draft, \
    make_family_target
from dflash.decoding.loop import SpeculativeDecoder
from dflash.engine.cuda.moe import MoEWeights, moe_torch, route

MOE = ("qwen3_moe", "gpt_oss")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA + Triton")


def _sharpen_all(model, std=0.08):
    """Non-zero expert tensors and biases too (families.py draws only the 2-D weights)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 3 or name.endswith("bias") or name.endswith("sinks"):
                p.normal_(0.0, std)
    return model


@pytest.mark.parametrize("family,extra", [("qwen3_moe", {}),
                                          ("qwen3_moe", dict(norm_topk_prob=True)),
                                          ("gpt_oss", {})])
def test_twin_equals_hf_block(family, extra):
    target = _sharpen_all(make_family_target(family, **extra))
    g = torch.Generator().manual_seed(0)
    for layer in target.model.layers:
        mw = MoEWeights.from_block(layer.mlp)
        assert mw is not None and mw.kind == ("qwen3" if family == "qwen3_moe" else "gpt_oss")
        x = torch.randn(1, 9, 64, generator=g, dtype=torch.float64)
        want = layer.mlp(x)
        want = want[0] if isinstance(want, tuple) else want
        torch.testing.assert_close(mw(x), want, rtol=1e-10, atol=1e-10)


def test_unsupported_blocks_are_refused():
    for family in ("qwen3_5_moe", "qwen3_next", "gemma4_moe"):  # shared experts, other layouts
        target = make_family_target(family)
        blocks = [l.mlp for l in target.model.layers if not hasattr(l.mlp, "gate_proj")]
        assert all(MoEWeights.from_block(b) is None for b in blocks), family
    dense = make_family_target("qwen3_moe", mlp_only_layers=[0, 2])
    kinds = [MoEWeights.from_block(l.mlp) is not None for l in dense.model.layers]
    assert kinds == [False, True, False, True]


def _fast(target, draft):
    dec = SpeculativeDecoder(target, draft, engine="fast", compile=False, _cpu_graph_mode=True)
    eng = dec.engines.ensure(64)[0]
    assert dec.engine_name == "fast" and eng.fused
    return dec, eng


@pytest.mark.parametrize("family", MOE)
def test_fast_path_greedy_lossless(family):
    target, draft, prompts, refs = family_case(family)  # trained briefly: accepts often
    dec, eng = _fast(target, draft)
    assert all(fl.moe is not None for fl in eng.fused_layers)
    for i in range(0, len(prompts), 3):
        for b in (4, 16):
            assert dec.generate(prompts[i], len(refs[i]), block_size=b).output_ids == refs[i], \
                (i, b)


def test_fast_path_mixed_dense_and_moe_layers():
    """Qwen3-MoE with dense layers (mlp_only_layers) and renormalised top-k weights."""
    target = make_family_target("qwen3_moe", mlp_only_layers=[0], norm_topk_prob=True)
    dec, eng = _fast(target, make_family_draft(target))
    assert [fl.moe is None for fl in eng.fused_layers] == [True, False, False, False]
    for ids in family_prompts(3, seed=4):
        ref = greedy_reference(target, ids, 16)
        for b in (4, 16):
            assert dec.generate(ids, 16, block_size=b).output_ids == ref, b


# ----------------------------------------------------------------------------- CUDA only
def _cuda_block(family, dtype, hidden=256, inter=128, experts=8, top_k=2):
    kw = dict(hidden_size=hidden, moe_intermediate_size=inter, intermediate_size=inter,
              num_experts=experts, num_local_experts=experts, num_experts_per_tok=top_k)
    target = _sharpen_all(make_family_target(family, dtype=torch.float32, **kw), 0.05)
    return MoEWeights.from_block(target.model.layers[0].mlp.to("cuda", dtype))


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("family,hidden", [("qwen3_moe", 256), ("gpt_oss", 192)])
def test_kernel_matches_twin_and_is_row_invariant(family, hidden, dtype):
    from dflash.engine.cuda.moe import moe_triton

    mw = _cuda_block(family, dtype, hidden=hidden)  # 192: K not a multiple of BLOCK_K
    x = torch.randn(16, hidden, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    x = x.to(dtype)
    ids, w = route(x, mw)
    got = moe_triton(x, ids, w, mw)
    want = moe_torch(x, ids, w, mw)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    for t in (0, 5, 15):  # a token alone == the same token in the block of 16, bitwise
        one = moe_triton(x[t:t + 1], ids[t:t + 1], w[t:t + 1], mw)
        assert torch.equal(one[0], got[t]), t
    # routing too: the router GEMM of one row does not depend on the others
    ids1, w1 = route(x[3:4], mw)
    assert torch.equal(ids1[0], ids[3]) and torch.equal(w1[0], w[3])


@cuda
@pytest.mark.parametrize("window", [None, 24])
def test_decode_attention_with_sinks(window):
    from dflash.engine.cuda.kernels import decode_attention
    from dflash.engine.static import _sink_attention

    g = torch.Generator("cuda").manual_seed(2)
    h, hkv, d, cap, t = 8, 2, 64, 256, 16
    q = torch.randn(1, h, t, d, device="cuda", generator=g).bfloat16()
    k = torch.randn(1, hkv, cap, d, device="cuda", generator=g).bfloat16()
    v = torch.randn(1, hkv, cap, d, device="cuda", generator=g).bfloat16()
    sinks = (3 * torch.randn(h, device="cuda", generator=g)).bfloat16()
    pos = torch.arange(100, 100 + t, device="cuda")
    slots = torch.arange(cap, device="cuda")
    mask = slots[None, :] <= pos[:, None]
    if window:
        mask &= slots[None, :] > pos[:, None] - window
    got = decode_attention(q, k, v, pos, window=window, sinks=sinks)
    want = _sink_attention(q.float(), k.float(), v.float(), mask[None, None], sinks.float())
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
    plain = decode_attention(q, k, v, pos, window=window)
    assert not torch.allclose(plain.float(), want, atol=2e-2)  # the sinks did change it


def _cuda_target(family, dtype):
    kw = dict(hidden_size=256, head_dim=64, moe_intermediate_size=128, intermediate_size=128,
              num_experts=8, num_local_experts=8, vocab_size=512, sliding_window=16)
    target = _sharpen_all(make_family_target(family, dtype=torch.float32, **kw), 0.05)
    return target.to("cuda", dtype)


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("family", MOE)
def test_fast_engine_cuda_lossless(family, dtype):
    """Real graphs: speculative == AR on the fast engine, token for token (bf16: row
    invariance of every kernel); float32: also == target.generate."""
    from dflash.model.toy import make_random_draft

    target = _cuda_target(family, dtype)
    draft = make_random_draft(target, block_size=16, dtype=dtype).to("cuda").eval()
    dec = SpeculativeDecoder(target, draft, engine="auto")
    assert dec.engine_name == "fast", dec.engines.description
    if dtype == torch.bfloat16:  # every MoE layer in the (row-invariant) Triton layer chain
        eng = dec.engines.ensure(64)[0]
        assert eng._chain(torch.zeros(16, 256, device="cuda", dtype=dtype))
    g = torch.Generator().manual_seed(5)
    for n in (9, 40):
        ids = torch.randint(1, 500, (1, n), generator=g).to("cuda")
        ar = dec.generate(ids, 32, block_size=1).output_ids
        for b in (4, 16):
            assert dec.generate(ids, 32, block_size=b).output_ids == ar, (n, b)
        if dtype == torch.float32:
            assert ar == greedy_reference(target, ids, 32), n
