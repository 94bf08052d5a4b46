"""python -m dflash.bench.families end to end on CPU (--tiny), its floor arithmetic and refusals."""
import json

import pandas as pd
import pytest

from dflash.bench import families as fam
from dflash.errors import UserError, run_cli


def test_expected_experts_and_read_bytes():
    # one token touches exactly k experts; 16 tokens under uniform routing: E*(1-(1-k/E)^16)
    assert fam.expected_experts(128, 8, 1) == pytest.approx(8)
    assert fam.expected_experts(128, 8, 16) == pytest.approx(128 * (1 - (15 / 16) ** 16))
    assert fam.expected_experts(32, 4, 16) == pytest.approx(32 * (1 - (7 / 8) ** 16))
    split = {"dense": 100.0, "experts": 1280.0, "embed": 50.0}  # embed: never read whole
    assert fam.read_bytes(split, 128, 8, 1) == pytest.approx(100 + 80)
    assert fam.read_bytes(split, 0, 0, 16) == pytest.approx(1380)


def test_tiny_families_end_to_end(tmp_path, capsys):
    out = tmp_path / "families.json"
    rc = fam.main(["--tiny", "--iters", "1", "--loop-tokens", "2", "--context", "16",
                   "--prompt-len", "6", "--check-tokens", "6", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    rows = json.loads(out.read_text())
    assert [r["family"] for r in rows] == ["qwen3_moe", "gpt_oss", "qwen3_5"]
    frame = pd.read_json(out)  # pandas-readable: one record per family
    assert list(frame["family"]) == ["qwen3_moe", "gpt_oss", "qwen3_5"]
    engines = {r["family"]: r["engine"] for r in rows}
    assert engines == {"qwen3_moe": "static", "gpt_oss": "static", "qwen3_5": "hf"}
    for r in rows:
        assert "error" not in r
        assert r["engine_line"] in text and r["engine_line"].startswith("engine: ")
        assert f"{r['layers']} of {r['layers_full']} layers" in text
        assert r["greedy_identical"] is True  # float32 tiny targets: speculative == AR
        assert r["tau"] >= 1
        for key in ("ar_step_ms", "cycle16_ms", "c16", "floor_ar_ms", "floor_cycle16_ms",
                    "floor_share_ar", "floor_share_cycle16"):
            assert r[key] > 0, key
        assert r["c16"] == pytest.approx(r["cycle16_ms"] / r["ar_loop_ms"])
        assert r["floor_cycle16_ms"] > r["floor_ar_ms"]  # more experts + the draft
    moe = rows[0]
    assert moe["experts"] == 8 and moe["experts_per_token"] == 2
    assert moe["ar_read_gb"] < moe["target_gb"]  # only the top-k experts of each layer
    assert "| family | layers | engine |" in text


@pytest.mark.parametrize("argv, needle", [
    (["--tiny", "--family", "llama9"], "--family: unknown family 'llama9'"),
    (["--tiny", "--layers", "1"], "--layers must be >= 2"),
    (["--tiny", "--iters", "0"], "--iters must be >= 1"),
    (["--tiny", "--context", "8"], "--context must be >= 16"),
    (["--device", "cpu"], "the real family shapes need a CUDA GPU"),
])
def test_bad_input_is_one_line(argv, needle, capsys):
    with pytest.raises(UserError, match=needle.replace("(", r"\(")):
        fam.main(argv)
    with pytest.raises(SystemExit) as exc:
        run_cli(fam.main, argv)
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
