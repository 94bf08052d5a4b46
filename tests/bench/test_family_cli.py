"""Issue 23, acceptance 3: benchmark.py end to end on CPU with tiny saved targets of a hybrid
family (qwen3_5: linear-attention layers) and of Gemma 4, each with the toy tokenizer and a
matching random draft: rc 0, greedy match, and the engine chosen for the family is said in
the printed summary and recorded in the result JSON."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from families import make_family_target  # noqa: E402

from conftest import run_script  # noqa: E402

CASES = {"qwen3_5": "hf (qwen3_5_text: linear-attention layers)",
         "gemma4": "hf (gemma4_text: "}


def save_family_pair(family, folder: Path):
    from dflash.model.toy import make_random_draft, make_toy_tokenizer

    tok = make_toy_tokenizer()
    target = make_family_target(family, dtype=torch.float32, vocab_size=len(tok),
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                bos_token_id=None)
    target.generation_config.eos_token_id = tok.eos_token_id
    draft = make_random_draft(target, block_size=4, mask_token_id=tok.convert_tokens_to_ids(
        "<|mask|>"))
    target.save_pretrained(folder / "target")
    tok.save_pretrained(folder / "target")
    draft.save_pretrained(folder / "draft")
    return folder / "target", folder / "draft"


@pytest.mark.parametrize("family", CASES)
def test_benchmark_runs_family_target(family, tmp_path):
    target, draft = save_family_pair(family, tmp_path)
    res = run_script(["benchmark.py", "--dataset", "builtin-code", "--max-samples", "2",
                      "--model-name-or-path", str(target), "--draft-name-or-path", str(draft),
                      "--max-new-tokens", "12", "--block-size", "4",
                      "--output-json", str(tmp_path / "s.json")])
    assert res.returncode == 0, res.stderr[-3000:]
    want = CASES[family]
    assert f"engine {want}" in res.stdout, res.stdout
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["engine"].startswith(want) and summary["complete"]
    assert summary["greedy_match_rate"] == 1.0
