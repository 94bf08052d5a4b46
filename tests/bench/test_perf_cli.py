"""python -m dflash.perf on CPU: named and local-config shapes, prefill against the compute
floor, one report; bad shapes refused in one line."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dflash.bench import perf

REPO = Path(__file__).resolve().parents[2]
QUICK = ["--device", "cpu", "--engines", "static", "--contexts", "16", "--prefill-lengths",
         "32,64", "--prefill-iters", "1", "--block-sizes", "2,4", "--iters", "2",
         "--loop-tokens", "6", "--skip-embedded", "--skip-dflash2"]


def _run(tmp_path, *extra):
    assert perf.main([*QUICK, "--out-dir", str(tmp_path), *extra]) == 0
    return json.loads((tmp_path / "perf.json").read_text()), (tmp_path / "PERFORMANCE.md").read_text()


def test_named_shapes_have_the_published_sizes():
    for name in ("qwen3-4b", "qwen3-8b", "llama-3.1-8b"):
        label, shape = perf.load_shape(name)
        assert label == name and shape["hidden_size"] in (2560, 4096)
    assert perf.load_shape("llama-3.1-8b")[1]["model_type"] == "llama"
    assert perf.load_shape("qwen3-8b")[1]["tie_word_embeddings"] is False


def test_prefill_flops_counts_weights_and_causal_attention():
    dims = dict(vocab_size=10, hidden_size=4, intermediate_size=8, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=2)
    per_layer = 4 * (4 + 2 * 2) + 4 * 4 + 3 * 4 * 8
    weights = 2 * per_layer + 4 * 10
    assert perf.prefill_flops(dims, 3) == 2 * weights * 3 + 2 * 2 * 3 * 3 * 4


def test_tiny_report_has_prefill_against_the_floor(tmp_path):
    report, md = _run(tmp_path, "--shape", "tiny")
    eng = report["engines"][0]
    assert set(eng["prefill_ms"]) == {"32", "64"} and all(v > 0 for v in eng["prefill_ms"].values())
    assert report["gemm_tflop_s"] > 0 and set(report["prefill_floor_ms"]) == {"32", "64"}
    assert report["dims"]["num_hidden_layers"] == perf.TINY["num_hidden_layers"]
    assert "prefill 64 tokens" in md and "% of floor" in md and "torch " in md


def test_local_config_shape(tmp_path):
    cfg = dict(model_type="llama", vocab_size=300, hidden_size=64, intermediate_size=128,
               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
               rms_norm_eps=1e-5, tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    d = tmp_path / "my-model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    report, md = _run(tmp_path / "out", "--shape", str(d))
    assert report["model_type"] == "llama" and report["shape"] == "my-model"
    assert report["dims"]["head_dim"] == 16 and report["dims"]["vocab_size"] == 300


def test_floor_leaves_out_an_untied_input_table():
    import torch
    for tied in (True, False):
        shape = dict(perf.TINY, tie_word_embeddings=tied)
        target, _ = perf.build_models(shape, torch.device("cpu"), torch.float32)
        table = target.get_input_embeddings().weight.numel() * 4
        assert perf.weight_bytes(target) - perf.read_bytes_per_step(target) == (0 if tied else table)


@pytest.mark.parametrize("shape, says", [("no-such-shape", "not a known shape"),
                                         ("BADJSON", "cannot read")])
def test_bad_shape_is_one_line(tmp_path, shape, says):
    if shape == "BADJSON":
        shape = str(tmp_path / "config.json")
        Path(shape).write_text("{not json")
    proc = subprocess.run([sys.executable, "-m", "dflash.perf", "--device", "cpu", "--shape", shape],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert says in proc.stderr and len(proc.stderr.strip().splitlines()) <= 2, proc.stderr
