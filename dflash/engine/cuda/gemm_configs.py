"""Where each skinny-GEMM config comes from: (N, K) -> (BLOCK_N, BLOCK_K, SPLIT_K, warps,
stages), or None where cuBLAS is faster.

In order: this machine's tuning cache (written by ``autotune``, keyed by GPU, driver, Triton
and torch), the repo's table for this GPU model (``configs/skinny_gemm_<gpu>.json``, the H100
one for any other GPU), the heuristic. The kernels (``kernels``, ``layer``, ``moe``,
``dflash2``) read configs here; the tuner writes them here; this module imports neither.
"""
from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

_tables: dict[str, dict] = {}  # cache file -> its configs, as this process knows them
_warned: set[str] = set()


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "none"
    return getattr(triton, "__version__", "none")


# (N, K) -> (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) for the Qwen3-4B target/draft
# shapes, tuned per GPU model by scripts/tune_skinny_gemm.py and (the four decoder-layer
# shapes, inside the graphed step) scripts/tune_layer_step.py. The H100 table serves every
# GPU without its own; unknown shapes use a heuristic.
CONFIG_DIR = Path(__file__).parent / "configs"
TABLE_PATH = CONFIG_DIR / "skinny_gemm_h100.json"


def table_path(gpu_name: str) -> Path:
    """The tuned table for a GPU model: configs/skinny_gemm_<model>.json whose <model> is in
    the device name ('h200' for 'NVIDIA H200'); the H100 table otherwise."""
    name = gpu_name.lower()
    tables = sorted(CONFIG_DIR.glob("skinny_gemm_*.json"), key=lambda p: -len(p.stem))
    for path in tables:  # the longest (most specific) model name first
        if path.stem[len("skinny_gemm_"):] in name:
            return path
    return TABLE_PATH


def load_table(path: Path = TABLE_PATH) -> dict[tuple[int, int], tuple[int, ...]]:
    if not path.exists():
        return {}
    raw = json.loads(path.read_text())["configs"]
    # A null entry means cuBLAS was faster for that shape.
    return {tuple(int(v) for v in key.split(",")): tuple(cfg) if cfg else None
            for key, cfg in raw.items()}


@functools.lru_cache(maxsize=None)
def tuned_table() -> dict[tuple[int, int], tuple[int, ...] | None]:
    """The table for the current GPU, loaded on first use (scripts may edit the dict)."""
    name = torch.cuda.get_device_name(torch.cuda.current_device()) if torch.cuda.is_available() else ""
    table = load_table(table_path(name))
    if name:  # tuned on this very GPU: more specific than a shipped (perhaps other GPU's) table
        table.update(cached_table(name))  # written by engine/cuda/autotune.py
    return table


def heuristic_config(n: int, k: int, sms: int = 132) -> tuple[int, int, int, int, int]:
    """Enough programs to fill the GPU a few times over, K split only for narrow outputs."""
    block_n = 64
    block_k = 128 if k % 128 == 0 else 64  # e.g. K = 2880 (gpt-oss): still the skinny kernel
    split = 1
    while (n // block_n) * split < 4 * sms and k % (2 * split * block_k) == 0 and split < 16:
        split *= 2
    return block_n, block_k, split, 4, 4


def valid_config(n: int, k: int, cfg) -> bool:
    block_n, block_k, split, _, _ = cfg
    return k % (split * block_k) == 0


@functools.lru_cache(maxsize=None)
def config_for(n: int, k: int):
    tuned = tuned_table()
    if (n, k) in tuned and tuned[(n, k)] is None:
        return None
    cfg = tuned.get((n, k))
    if cfg is None or not valid_config(n, k, cfg):
        sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
        cfg = heuristic_config(n, k, sms)
    return cfg if valid_config(n, k, cfg) else None


# ----------------------------------------------------------------------------- this machine's cache
def cache_root() -> Path:
    root = os.environ.get("DFLASH_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = os.path.join(xdg, "dflash") if xdg else os.path.join(os.path.expanduser("~"), ".cache", "dflash")
    return Path(root)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", str(text).lower()).strip("-") or "unknown"


@functools.lru_cache(maxsize=None)
def driver_version() -> str:
    """The NVIDIA driver version: torch, else pynvml, else nvidia-smi, else 'unknown'."""
    get = getattr(torch.cuda, "driver_version", None)
    if get is not None:
        try:
            return str(get())
        except Exception:  # noqa: BLE001 - fall through to the next source
            pass
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # noqa: BLE001 - not installed, or no NVML
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=5, check=True).stdout
        return out.strip().splitlines()[0].strip() or "unknown"
    except Exception:  # noqa: BLE001 - no nvidia-smi, or it failed
        return "unknown"


def versions() -> dict[str, str]:
    """What a tuned config depends on besides the GPU model."""
    return {"driver": driver_version(), "triton": _triton_version(),
            "torch": torch.__version__}


def cache_path(gpu_name: str) -> Path:
    v = versions()
    name = (f"{_slug(gpu_name)}__driver-{_slug(v['driver'])}__triton-{_slug(v['triton'])}"
            f"__torch-{_slug(v['torch'])}.json")
    return cache_root() / "skinny_gemm" / name


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        print(f"warning: {message}", file=sys.stderr)


def _parse(configs: dict) -> dict[tuple[int, int], tuple[int, ...] | None]:
    table = {}
    for key, cfg in configs.items():
        n, k = (int(v) for v in key.split(","))
        if cfg is not None:
            cfg = tuple(int(v) for v in cfg)
            if len(cfg) != 5 or min(cfg) < 1:
                raise ValueError(f"bad config {key}: {cfg}")
        table[(n, k)] = cfg
    return table


def _read(path: Path) -> dict:
    """The configs in a cache file; {} (with one warning) if it is unreadable or corrupt."""
    try:
        return _parse(json.loads(path.read_text())["configs"])
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        _warn_once(str(path), f"ignoring the GEMM tuning cache {path} ({type(err).__name__}: {err})")
        return {}


def cached_table(gpu_name: str) -> dict:
    """(N, K) -> config (or None = cuBLAS) tuned earlier on this machine for ``gpu_name``,
    with this driver, Triton and torch. Read once per process."""
    path = cache_path(gpu_name)
    if str(path) not in _tables:
        _tables[str(path)] = _read(path)
    return dict(_tables[str(path)])


def store(gpu_name: str, new: dict) -> Path:
    """Add ``new`` configs to the cache (atomically; merged with what another process may have
    written meanwhile). An unwritable cache keeps them in memory for this process."""
    from ...runlog import atomic_write_json

    path = cache_path(gpu_name)
    table = {**_read(path), **_tables.get(str(path), {}), **new}
    _tables[str(path)] = table
    doc = {"gpu": gpu_name, **versions(), "note": "written by dflash.engine.cuda.autotune",
           "configs": {f"{n},{k}": (list(cfg) if cfg else None) for (n, k), cfg in sorted(table.items())}}
    try:
        atomic_write_json(path, doc)
    except OSError as err:
        _warn_once(f"write:{path}", f"cannot write the GEMM tuning cache {path} ({err}); "
                                    "the tuned configs last for this process only")
    tuned_table.cache_clear()
    config_for.cache_clear()
    return path


@functools.lru_cache(maxsize=None)
def shipped_table(gpu_name: str) -> dict:
    """The repo's table tuned on this GPU model ({} when only the H100 fallback applies)."""
    path = table_path(gpu_name)
    return load_table(path) if path.stem[len("skinny_gemm_"):] in gpu_name.lower() else {}
