"""benchmark.py end to end on CPU: single process, torchrun with 2 ranks, and bad input."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_script


def test_single_process_run_writes_summary_and_jsonl(toy_pair, tmp_path):
    target, draft = toy_pair
    out = tmp_path / "run.jsonl"
    res = run_script(["benchmark.py", "--dataset", "builtin-code", "--max-samples", "3",
                      "--model-name-or-path", str(target), "--draft-name-or-path", str(draft),
                      "--max-new-tokens", "24", "--block-size", "4", "--collect-profile",
                      "--save-outputs-path", str(out), "--output-json", str(tmp_path / "s.json")])
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["samples_done"] == 3 and summary["complete"]
    for mode in ("baseline", "speculative"):
        for key in ("tpot", "ttft", "total_wall_s", "tokens_per_sec", "tau", "acceptance_histogram"):
            assert summary[mode][key] is not None
    assert summary["speedup"] > 0
    assert summary["greedy_match_rate"] == 1.0
    assert summary["environment"]["torch_version"]
    assert len(summary["speculative"]["acceptance_histogram"]) == 4
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    assert lines[0]["type"] == "header" and len(lines) == 4
    for word in ("TPOT", "TTFT", "tokens_per_sec", "speedup", "tau", "histogram", "torch"):
        assert word in res.stdout


def test_torchrun_two_ranks_gathers_each_sample_once(toy_pair, tmp_path):
    target, draft = toy_pair
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node=2", "--master_port=29731", "benchmark.py",
           "--dataset", "builtin-math", "--max-samples", "5", "--model-name-or-path", str(target),
           "--draft-name-or-path", str(draft), "--max-new-tokens", "16", "--block-size", "4",
           "--save-outputs-path", str(tmp_path / "r.jsonl"), "--output-json", str(tmp_path / "s.json")]
    res = subprocess.run(cmd, cwd=REPO, text=True, capture_output=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["world_size"] == 2
    assert sorted(summary["sample_ids"]) == [f"builtin-math/{i}" for i in range(5)]
    assert {r["rank"] for r in summary["per_sample"]} == {0, 1}
    samples = [json.loads(l) for l in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert sorted(s["id"] for s in samples if s["type"] == "sample") == summary["sample_ids"]


@pytest.mark.parametrize("args, needle", [
    (["--dataset", "no-such-set"], "unknown dataset"),
    (["--dataset", "builtin-code", "--model-name-or-path", "/no/such/model"], "does not exist"),
    (["--dataset", "builtin-code", "--block-size", "0"], "--block-size must be >= 1"),
    (["--dataset", "builtin-code", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["--dataset", "builtin-code", "--temperature", "-1"], "--temperature"),
    (["--dataset", "builtin-code", "--max-samples", "0"], "--max-samples"),
])
def test_bad_input_is_one_line_and_non_zero(args, needle, toy_pair):
    target, draft = toy_pair
    full = ["benchmark.py", "--model-name-or-path", str(target), "--draft-name-or-path", str(draft),
            *args]
    res = run_script(full, timeout=120)
    assert res.returncode != 0
    err = [l for l in res.stderr.strip().splitlines() if l.strip()]
    assert len(err) == 1, res.stderr
    assert needle in err[0] and "Traceback" not in res.stderr


def test_draft_for_another_target_is_refused(toy_pair, tmp_path):
    from dflash.model.toy import save_toy_pair
    other_target, other_draft = save_toy_pair(tmp_path / "other", hidden_size=32, num_layers=2)
    target, _ = toy_pair
    res = run_script(["benchmark.py", "--dataset", "builtin-code", "--max-samples", "1",
                      "--model-name-or-path", str(target), "--draft-name-or-path", str(other_draft),
                      "--max-new-tokens", "8"], timeout=120)
    assert res.returncode != 0 and "does not fit the target" in res.stderr
    assert "Traceback" not in res.stderr
