"""Issue 20's leftover behaviours of the bench room, each checked as a user meets it:

* a refusal inside a torchrun launch reads as the worker's one line and its exit status, not
  torchrun's ChildFailedError traceback (through a wrapper; run directly, the one line and a
  non-zero exit), while a crash keeps torchrun's report;
* SIGTERM to a wrapper exits 143, SIGINT 130 (with the summary of what finished);
* ``python -m dflash.analyze ... | head`` ends quietly (no BrokenPipeError);
* (issue 21) ``--engine auto`` falling back for a target family says so once.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO
from dflash.bench import launch
from dflash.runlog import read_jsonl

from test_analyze import write_sweeps
from test_wrappers import WRAPPER_VARS, pair_env, read_csv, wrapper  # noqa: F401 (fixture)

# What torchrun 2.x prints around a worker that exited with status 2 (pid, times, paths vary).
TORCHRUN_REPORT = """\
E1203 14:22:33.564000 11393 torch/distributed/elastic/multiprocessing/api.py:1002] failed \
(exitcode: 2) local_rank: 0 (pid: 11396) of binary: /x/.venv/bin/python
Traceback (most recent call last):
  File "/x/.venv/bin/torchrun", line 6, in <module>
    sys.exit(main())
  File "/x/torch/distributed/launcher/api.py", line 383, in launch_agent
    raise ChildFailedError(
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
benchmark.py FAILED
------------------------------------------------------------
Failures:
  <NO_OTHER_FAILURES>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  exitcode  : 2 (pid: 11396)
  error_file: <N/A>
============================================================
"""


def _filtered(text: str, chunk: int) -> tuple[str, int | None]:
    f = launch.TorchrunFilter()
    data = text.encode()
    out = b"".join(f.feed(data[i:i + chunk]) for i in range(0, len(data), chunk)) + f.flush()
    return out.decode(), f.worker_exit


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_torchrun_report_is_dropped_and_the_exit_status_kept(chunk):
    one_line = "benchmark.py: error: --block-size must be >= 1, got 0\n"
    out, code = _filtered(one_line + TORCHRUN_REPORT, chunk)
    assert out == one_line + "torchrun: local rank 0 exited with status 2\n"
    assert code == 2
    # our own tracebacks (--verbose) and progress bars pass unchanged
    ours = ("samples: 50%\rsamples: 100%\n"
            "Traceback (most recent call last):\n  File \"/x/benchmark.py\", line 3\nValueError: x\n")
    assert _filtered(ours, chunk) == (ours, None)


@pytest.mark.slow
def test_refusal_under_torchrun_is_one_line_and_its_exit_status(tmp_path, pair_env):
    """NPROC=2 runs torchrun; --block-size 0 is refused in each worker before any model
    loads. The user sees the one line (and torchrun's exit status replaced by the worker's)."""
    env = {**pair_env, "TASKS": "builtin-code:1", "BLOCK_SIZE": 0, "NPROC": 2,
           "MAX_NEW_TOKENS": 8, "LOG_DIR": tmp_path, "RUN_TAG": "tr", "QUIET": "0",
           "MASTER_PORT_BASE": 29840}
    res = wrapper("run_benchmark.sh", env)
    text = res.stdout + res.stderr
    assert res.returncode == 2, text
    assert "benchmark.py: error: --block-size must be >= 1, got 0" in text
    assert "Traceback" not in text and "ChildFailedError" not in text, text
    assert "exited with status 2" in text
    row = read_csv(tmp_path / "bench_tr" / "summary.csv").iloc[0]
    assert row["status"] == "failed" and row["returncode"] == 2
    assert row["error"].startswith("benchmark.py: error: --block-size must be >= 1")


def _torchrun() -> list[str]:
    script = Path(sys.executable).with_name("torchrun")
    return [str(script)] if script.exists() else [sys.executable, "-m", "torch.distributed.run"]


def _direct_torchrun(args, tmp_path, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k not in ("DFLASH_QUIET_TORCHRUN",
                                                           "DFLASH_VERBOSE")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run([*_torchrun(), "--nproc_per_node=1", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)


def test_refusal_under_a_direct_torchrun_is_our_one_line(tmp_path):
    """``torchrun --nproc_per_node=1 benchmark.py <bad args>``, not through a wrapper: the
    worker's one line, a non-zero exit (torchrun cannot exit with the worker's status without
    its report: see errors.end_torchrun_quietly), no torchrun report."""
    res = _direct_torchrun([str(REPO / "benchmark.py"), "--dataset", "builtin-code",
                            "--block-size", "0"], tmp_path)
    ours = [ln for ln in res.stderr.splitlines() if "error" in ln.lower()]
    assert ours == ["benchmark.py: error: --block-size must be >= 1, got 0"], res.stderr
    assert res.returncode != 0
    assert "Traceback" not in res.stderr and "ChildFailedError" not in res.stderr, res.stderr


def test_a_crash_under_a_direct_torchrun_keeps_its_report(tmp_path):
    """A bug is not a refusal: torchrun's report (and exit 1) stays; the wrappers' opt-out
    (DFLASH_QUIET_TORCHRUN=0) keeps the report of a refusal for their filter."""
    script = tmp_path / "crash.py"
    script.write_text("import sys\nfrom dflash.errors import UserError, run_cli\n"
                      "def main(argv):\n"
                      "    if argv == ['bad']:\n        raise UserError('--x is bad')\n"
                      "    raise RuntimeError('a genuine bug')\n"
                      "run_cli(main)\n")
    res = _direct_torchrun([str(script), "boom"], tmp_path)
    assert res.returncode == 1
    assert "crash.py: error: RuntimeError: a genuine bug" in res.stderr
    assert "ChildFailedError" in res.stderr, res.stderr
    res = _direct_torchrun([str(script), "bad"], tmp_path, {"DFLASH_QUIET_TORCHRUN": "0"})
    assert "crash.py: error: --x is bad" in res.stderr
    assert res.returncode == 1 and "exitcode: 2" in res.stderr, res.stderr


def _samples(path) -> int:
    if not path.exists():
        return 0
    records, _ = read_jsonl(path)
    return sum(1 for r in records if r.get("type") == "sample")


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_to_a_wrapper_exits_143_or_130(sig, code, tmp_path, pair_env):
    """A signal sent to the wrapper's process alone (``kill``, not Ctrl-C to the group) is
    passed to the running benchmark, which writes the summary of its finished samples."""
    env = {k: v for k, v in os.environ.items() if k not in WRAPPER_VARS}
    env.update({**pair_env, "TASKS": "builtin-code:40", "BLOCK_SIZE": "4", "NPROC": "1",
                "MAX_NEW_TOKENS": "48", "LOG_DIR": str(tmp_path), "RUN_TAG": "sig",
                "EXTRA_ARGS": "--warmup-runs 0", "QUIET": "1", "PYTHONUNBUFFERED": "1"})
    proc = subprocess.Popen(["bash", "run_benchmark.sh"], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    jsonl = tmp_path / "bench_sig" / "builtin-code_b4.jsonl"
    end = time.monotonic() + 180
    while _samples(jsonl) < 1:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, "no sample finished in time"
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=150)
    assert proc.returncode == code, out + err
    assert "Traceback" not in err, err
    row = read_csv(tmp_path / "bench_sig" / "summary.csv").iloc[0]
    assert row["status"] == "interrupted" and 1 <= row["samples_done"] < 40


def test_analyze_into_head_ends_quietly(tmp_path):
    """The real ``python -m dflash.analyze`` piped into ``head -n 1``."""
    inputs = write_sweeps(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    writer = subprocess.Popen([sys.executable, "-m", "dflash.analyze", *inputs, "--no-plot",
                               "--out-dir", str(tmp_path / "out")], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reader = subprocess.run(["head", "-n", "1"], stdin=writer.stdout, capture_output=True)
    writer.stdout.close()
    err = writer.stderr.read().decode()
    assert writer.wait(timeout=120) == 0, err
    assert reader.stdout.decode().strip()
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert (tmp_path / "out" / "analysis.md").exists()


@pytest.fixture(scope="module")
def hf_family_pair(tmp_path_factory):
    """A tiny Qwen3.5 (linear-attention layers) target with the toy tokenizer and a random
    draft: ``--engine auto`` falls back to the hf engine for it on CPU."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from dflash.model.toy import make_random_draft, make_toy_tokenizer

    folder = tmp_path_factory.mktemp("qwen3_5")
    tok = make_toy_tokenizer()
    cfg = AutoConfig.for_model(
        "qwen3_5_text", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
        linear_value_head_dim=16, full_attention_interval=2, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    target = AutoModelForCausalLM.from_config(cfg).eval()
    target.generation_config.eos_token_id = tok.eos_token_id
    draft = make_random_draft(target, block_size=4,
                              mask_token_id=tok.convert_tokens_to_ids("<|mask|>"), seed=1)
    target.save_pretrained(folder / "target")
    tok.save_pretrained(folder / "target")
    draft.save_pretrained(folder / "draft")
    return folder / "target", folder / "draft"


def test_engine_fallback_is_said_once(hf_family_pair, tmp_path, capsys):
    """auto on a family the default engine cannot run: the choice is one line of the
    output (the summary's), not also Engines' own line per decoder."""
    from dflash.bench import benchmark_cli

    target, draft = hf_family_pair
    argv = ["--dataset", "builtin-code", "--max-samples", "1", "--max-new-tokens", "4",
            "--model-name-or-path", str(target), "--draft-name-or-path", str(draft),
            "--block-size", "4", "--warmup-runs", "0", "--output-json", str(tmp_path / "s.json")]
    assert benchmark_cli.main(argv) == 0
    out, err = capsys.readouterr()
    summary = json.loads((tmp_path / "s.json").read_text())
    line = summary["engine"]
    assert line.startswith("hf (qwen3_5_text: "), line
    print(line)
    assert (out + err).count(line) == 1, out + err
    assert summary["config"]["engine"] == "auto"
