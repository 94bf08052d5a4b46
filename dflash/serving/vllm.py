"""Launching vLLM (``vllm serve <target>``, baseline and with DFlash speculative decoding) and
the mapping of this script's server flags onto vLLM's. Facts: docs/SGLANG.md (vLLM section).

    --tp-size                -> --tensor-parallel-size
    --mem-fraction-static    -> --gpu-memory-utilization
    --max-running-requests   -> --max-num-seqs
    --dtype, --host, --port  -> the same
    --seed                   -> --seed
    --block-size B           -> --speculative-config {..., "num_speculative_tokens": B - 1}
    --attention-backends     -> --attention-backend (flashinfer FLASHINFER, fa3 FLASH_ATTN,
                                triton TRITON_ATTN, flex_attention FLEX_ATTENTION); left out,
                                vLLM chooses
    --disable-radix-cache    -> --no-enable-prefix-caching
    --batch-requests         refused (OpenAI requests carry one prompt each here)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..errors import UserError
from .cli import DEFAULT_BACKENDS
from .servers import GpuInfo, check_server_environment, launch_override, package_version

VLLM_ENV_VAR = "DFLASH_VLLM_LAUNCH_CMD"
MIN_VLLM = (0, 20)
DEFAULT_BLOCK = 16  # the z-lab DFlash-b16 drafts
BACKENDS = {"flashinfer": "FLASHINFER", "fa3": "FLASH_ATTN", "triton": "TRITON_ATTN",
            "flex_attention": "FLEX_ATTENTION"}
# POST /reset_prefix_cache (between configurations) exists only in vLLM's dev mode.
LAUNCH_ENV_DEFAULTS = {"VLLM_SERVER_DEV_MODE": "1"}


def backends(args: argparse.Namespace) -> list[str]:
    """Our backend names to launch with ("auto": vLLM's own choice, when the flag is left at
    its SGLang default); refuses names vLLM has no equivalent for."""
    if args.attention_backends == DEFAULT_BACKENDS:
        return ["auto"]
    for name in args.backend_list:
        if name not in BACKENDS:
            raise UserError(f"--attention-backends {name} has no vLLM equivalent",
                            "with --engine vllm use flashinfer, fa3 (FLASH_ATTN), triton or "
                            "flex_attention, or leave the flag out to let vLLM choose")
    return list(args.backend_list)


def block_size(args: argparse.Namespace) -> tuple[int, str]:
    """(block size, where it came from): --block-size, else a local draft's config.json,
    else 16."""
    if args.block_size is not None:
        return args.block_size, "--block-size"
    cfg = Path(os.path.expanduser(args.draft_model or "")) / "config.json"
    try:
        value = json.loads(cfg.read_text()).get("block_size")
        if isinstance(value, int) and value >= 1:
            return value, f"{cfg}"
    except (OSError, ValueError, AttributeError):
        pass
    return DEFAULT_BLOCK, "the DFlash-b16 default; --block-size sets another"


def launch_prefix(args: argparse.Namespace) -> tuple[list[str], bool]:
    """``vllm serve`` (the entry point beside this Python when there is one), or the override
    of ``DFLASH_VLLM_LAUNCH_CMD`` / --server-cmd, and whether overridden."""
    prefix = launch_override(args, VLLM_ENV_VAR)
    if prefix:
        return prefix, True
    beside = Path(sys.executable).parent / "vllm"
    return [str(beside) if beside.exists() else "vllm", "serve"], False


def launch_command(args: argparse.Namespace, mode: str, backend: str, port, prefix: list[str]
                   ) -> list[str]:
    cmd = list(prefix) + [args.target_model]
    if mode == "dflash":
        block, _ = block_size(args)
        spec = {"method": "dflash", "model": args.draft_model,
                "num_speculative_tokens": max(1, block - 1)}
        cmd += ["--speculative-config", json.dumps(spec)]
    if backend != "auto":
        cmd += ["--attention-backend", BACKENDS.get(backend, backend)]
    cmd += ["--tensor-parallel-size", str(args.tp_size), "--dtype", args.dtype,
            "--gpu-memory-utilization", f"{args.mem_fraction_static:g}",
            "--max-num-seqs", str(args.max_running_requests), "--seed", str(args.seed),
            "--trust-remote-code", "--host", args.host, "--port", str(port)]
    if args.disable_radix_cache:
        cmd.append("--no-enable-prefix-caching")
    return cmd + list(args.server_arg_list)


def launch_env_additions() -> dict[str, str]:
    return {k: os.environ.get(k, v) for k, v in LAUNCH_ENV_DEFAULTS.items()}


def vllm_version() -> str | None:
    return package_version("vllm")


def check_launch_environment(args: argparse.Namespace, overridden: bool) -> GpuInfo | None:
    """Make sure vLLM servers can be launched here; return the GPU (None when unknown)."""
    version = None if overridden else vllm_version()
    return check_server_environment(
        args, overridden, engine="vLLM", package="vllm", version=version,
        hint="run this on a GPU machine in the vLLM environment (pip install -r "
             "requirements-vllm.txt), or pass --base-url to benchmark a running server",
        minimum=tuple(MIN_VLLM),
        too_old=(f"vllm {version} has no DFlash speculative method",
                 "install vllm>=0.20 (pip install -r requirements-vllm.txt)"))
