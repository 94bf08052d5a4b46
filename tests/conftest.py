import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
EMBEDDED = (REPO / "models" / "tiny-target" / "config.json").exists() and \
    (REPO / "models" / "tiny-draft" / "config.json").exists()

torch.set_num_threads(1)  # tiny models: extra threads only add sync cost

# Nothing outside the checkout changes what the suite sees: a dataset or model a user has
# cached (~/.cache/dflash, the Hugging Face cache) would turn "not reachable" paths into
# loads. Subprocesses inherit these.
_ISOLATED = tempfile.mkdtemp(prefix="dflash-tests-")
os.environ["DFLASH_CACHE_DIR"] = os.path.join(_ISOLATED, "dflash")
os.environ["HF_HOME"] = os.path.join(_ISOLATED, "hf")
os.environ.pop("HF_HUB_CACHE", None)
os.environ.pop("HF_DATASETS_CACHE", None)
# No first-use GEMM tuning on a GPU (up to 50 s per process for the tests' tiny shapes, in
# the fresh cache above); tests/engine/test_autotune.py turns it back on.
os.environ.setdefault("DFLASH_AUTOTUNE", "0")


@pytest.fixture(scope="session")
def toy_pair(tmp_path_factory):
    """(target_dir, draft_dir) of a random tiny pair with a tokenizer, block size 8."""
    from dflash.model.toy import save_toy_pair

    return save_toy_pair(tmp_path_factory.mktemp("toy"), block_size=8)


def run_script(args, timeout=300, env=None, cwd=REPO):
    """Run a repo script with this interpreter; returns CompletedProcess (text)."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    full_env.pop("DFLASH_VERBOSE", None)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, text=True,
                          capture_output=True, timeout=timeout)
