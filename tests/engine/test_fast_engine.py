"""The fast engine's code path (fused GEMMs, whole-buffer masks, fixed-shape draft appends).

CUDA graphs cannot be captured on CPU, but everything they replay runs here eagerly with the
same fixed shapes, so its logic is checked against the target's own greedy decoding (float64,
where fused and unfused GEMMs agree far below any logit gap).
"""
import pytest
import torch

from conftest import EMBEDDED
from dflash.decoding.loop import SpeculativeDecoder
from dflash.model.toy import make_random_draft, make_random_target


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_graph_mode_path_is_lossless(arch):
    target = make_random_target(arch=arch, vocab_size=96, hidden_size=64, num_layers=3,
                                dtype=torch.float64)
    draft = make_random_draft(target, block_size=16, dtype=torch.float64)
    fast = SpeculativeDecoder(target, draft, engine="fast", compile=False, _cpu_graph_mode=True)
    assert fast.graphs
    g = torch.Generator().manual_seed(5)
    for i in range(6):
        ids = torch.randint(1, 95, (1, 4 + 3 * i), generator=g)
        ref = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=33,
                              do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
        for b in (1, 3, 8, 16):
            assert fast.generate(ids, 33, block_size=b).output_ids == ref, (i, b)


def test_fused_layers_match_module_layers():
    target = make_random_target(vocab_size=64, hidden_size=64, num_layers=2, dtype=torch.float64)
    from dflash.engine.static import StaticTargetEngine
    plain = StaticTargetEngine(target, [0, 1], 64)
    fused = StaticTargetEngine(target, [0, 1], 64, fused=True)
    ids = torch.randint(0, 64, (1, 10))
    pos = torch.arange(10)
    a = plain.forward(ids, pos, kv_len=10)
    b = fused.forward(ids, pos)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)


def test_package_imports_without_triton():
    """CPU wheels of torch ship no Triton: every module must import and decode without it
    (the CUDA kernels are optional)."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['triton'] = None\n"
            "import dflash.engine.static, dflash.engine.cuda.layer, dflash.engine.cuda.kernels, dflash.decoding.loop\n"
            "import dflash.bench.perf, dflash.decoding.multiround\n"
            "assert dflash.engine.cuda.kernels.triton is None and not dflash.engine.cuda.layer.layer_kernels_enabled()\n"
            "from dflash.model.toy import make_random_target, make_random_draft\n"
            "from dflash.decoding.loop import SpeculativeDecoder\n"
            "import torch\n"
            "t = make_random_target(); d = make_random_draft(t)\n"
            "ids = torch.randint(0, 100, (1, 8))\n"
            "dec = SpeculativeDecoder(t, d)\n"
            "assert dec.generate(ids, 12, block_size=4).output_ids == "
            "dec.generate(ids, 12, block_size=1).output_ids\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_gemm_table_is_chosen_by_gpu_name():
    from dflash.engine.cuda.gemm_configs import load_table, table_path

    assert table_path("NVIDIA H200").name == "skinny_gemm_h200.json"
    assert table_path("NVIDIA H100 80GB HBM3").name == "skinny_gemm_h100.json"
    assert table_path("NVIDIA A100-SXM4-80GB").name == "skinny_gemm_h100.json"  # the default
    for name in ("NVIDIA H100", "NVIDIA H200"):
        table = load_table(table_path(name))
        assert (19456, 2560) in table and table[(151936, 2560)] is None  # LM head stays cuBLAS


class _Cycling:
    """A policy that changes the block size every cycle (so one generation uses every graph)."""

    def __init__(self, sizes):
        self.sizes, self.max_block_size = sizes, max(sizes)

    def select(self, cycle_idx):
        return self.sizes[cycle_idx % len(self.sizes)]

    def update(self, *args):
        pass


@pytest.mark.parametrize("pair", ["random", "embedded", "embedded-cuda"])
def test_fused_cycle_matches_unfused_graph_path(monkeypatch, pair):
    """The whole-cycle graph (dflash/cycle_graph.py) against the step-by-step graph-mode loop:
    same tokens, same accepted counts per cycle, for fixed sizes, the AR baseline, a policy
    switching size every cycle, truncation mode and a stop token. The embedded pair accepts
    long runs (a random draft accepts almost nothing)."""
    g = torch.Generator().manual_seed(7)
    if pair == "random":
        target = make_random_target(vocab_size=96, hidden_size=64, num_layers=3,
                                    dtype=torch.float64)
        draft = make_random_draft(target, block_size=16, dtype=torch.float64)
        prompts = [torch.randint(1, 95, (1, 5 + 4 * i), generator=g) for i in range(3)]
    else:
        if not EMBEDDED:
            pytest.skip("needs the embedded pair (models/tiny-target, models/tiny-draft)")
        cuda = pair.endswith("cuda")
        if cuda and not torch.cuda.is_available():
            pytest.skip("needs CUDA (real graphs, bf16, Triton kernels)")
        from dflash.bench.common import load_pair

        loaded = load_pair("embedded", "embedded", torch.device("cuda" if cuda else "cpu"),
                           "bfloat16" if cuda else "float32")
        target, draft = loaded.target, loaded.draft
        prompts = [torch.tensor([loaded.tokenizer.encode(text)]) for text in
                   ("def fibonacci(n):\n    if n < 2:\n        return n\n    return",
                    "class Stack:\n    def __init__(self):\n        self.items = []\n")]
    cases = [dict(block_size=1), dict(block_size=4), dict(block_size=16),
             dict(policy=_Cycling([16, 3, 1, 8, 12])),
             dict(policy=_Cycling([4, 8, 12]), draft_block_size=16)]

    def run(fused: bool):
        monkeypatch.setenv("DFLASH_FUSED_CYCLE", "1" if fused else "0")
        dec = SpeculativeDecoder(target, draft, engine="fast", compile=False, _cpu_graph_mode=True)
        out = []
        for ids in prompts:
            ids = ids.to(target.device)
            stop = int(ids[0, -1])
            for kw in cases:
                res = dec.generate(ids, 29, stop_token_ids=[stop], **kw)
                out.append((res.output_ids, [(c.block_size, c.tau) for c in res.cycles]))
        return out

    assert run(True) == run(False)
