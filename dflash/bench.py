"""Shared plumbing of the benchmark CLIs: models, prompts, distributed ranks, metrics, reports."""
from __future__ import annotations

import argparse
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .datasets import DATASET_NAMES, check_dataset_name
from .draft import DFlashDraftModel, resolve_dtype
from .errors import UserError
from .hub import EMBEDDED_DRAFT, EMBEDDED_TARGET, resolve_model_dir

HUB_TARGET = "Qwen/Qwen3-4B"
HUB_DRAFT = "z-lab/Qwen3-4B-DFlash-b16"


# ----------------------------------------------------------------------------- arguments
def add_common_args(parser: argparse.ArgumentParser, *, dataset_default: str | None = None) -> None:
    """Flags every Transformers-backend benchmark shares."""
    parser.add_argument("--dataset", default=dataset_default, required=dataset_default is None,
                        help=f"prompt set: {', '.join(DATASET_NAMES)}")
    parser.add_argument("--max-samples", type=int, default=None,
                        help="use the first N prompts of the dataset (default: all)")
    parser.add_argument("--model-name-or-path", default=None,
                        help=f"target: hub id, local folder or 'embedded' (default: {HUB_TARGET} "
                             "with CUDA, the embedded tiny target without)")
    parser.add_argument("--draft-name-or-path", default=None,
                        help=f"DFlash draft: hub id, local folder or 'embedded' (default: {HUB_DRAFT} "
                             "with CUDA, the embedded tiny draft without)")
    parser.add_argument("--max-new-tokens", type=int, default=2048)
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 = greedy; > 0 = exact speculative sampling at that temperature")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto",
                        help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16")
    parser.add_argument("--engine", default="auto", choices=["auto", "static", "hf"],
                        help="static: preallocated KV cache (+CUDA graphs on GPU); hf: plain eager "
                             "Transformers reference path")
    parser.add_argument("--enable-thinking", action="store_true",
                        help="keep Qwen3 thinking mode on in the chat template (off by default)")
    parser.add_argument("--no-chat-template", action="store_true",
                        help="feed the raw prompt text instead of applying the chat template")
    parser.add_argument("--offline-fallback", action="store_true",
                        help="if a hub dataset is out of reach, use the built-in set of its category")
    parser.add_argument("--save-outputs-path", default=None,
                        help="per-sample JSONL, appended as each sample finishes")
    parser.add_argument("--output-json", default=None, help="summary JSON (default: next to the JSONL, "
                                                            "or outputs/<script>_<dataset>.json)")
    parser.add_argument("--resume", action="store_true",
                        help="skip samples already in --save-outputs-path for the same configuration")
    parser.add_argument("--continue-on-error", action="store_true",
                        help="record a failing sample (e.g. out of memory) and go on")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow model repos to run their own code (never on by default)")
    parser.add_argument("--verbose", action="store_true", help="show tracebacks on errors")


def check_common_args(args) -> None:
    """Validate before any model is loaded: one clear line per problem."""
    check_dataset_name(args.dataset)
    if args.max_samples is not None and args.max_samples < 1:
        raise UserError(f"--max-samples must be >= 1, got {args.max_samples}")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.temperature >= 0 or args.temperature != args.temperature:
        raise UserError(f"--temperature must be >= 0, got {args.temperature}")
    for flag in ("save_outputs_path", "output_json"):
        value = getattr(args, flag, None)
        if value:
            check_writable(value, "--" + flag.replace("_", "-"))


def check_writable(path: str, flag: str) -> None:
    parent = Path(path).expanduser().resolve().parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise UserError(f"{flag} {path}: cannot write into {parent}", "choose a writable location")
    if Path(path).is_dir():
        raise UserError(f"{flag} {path} is a directory", "give a file path")


# ----------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_flag: str) -> Dist:
    """Join the torchrun group if launched by torchrun (NCCL on GPUs, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_flag != "cpu"
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank=rank, world=world, local_rank=local)


def gather_to_main(obj, d: Dist):
    """List of every rank's ``obj`` on rank 0 (None elsewhere)."""
    if d.world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * d.world if d.main else None
    if dist.get_backend() == "nccl":  # gather_object needs per-rank devices on NCCL
        everything = [None] * d.world
        dist.all_gather_object(everything, obj)
        return everything if d.main else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier_and_close(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- models
def pick_device(flag: str, d: Dist) -> torch.device:
    if flag == "auto":
        return torch.device(f"cuda:{d.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if flag.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {flag} requested but CUDA is not available", "use --device cpu")
    if flag == "cuda":
        return torch.device(f"cuda:{d.local_rank}")
    return torch.device(flag)


def default_model_names(model: str | None, draft: str | None, device: torch.device,
                        announce: bool = True) -> tuple[str, str]:
    """The spec's hub pair on CUDA, the embedded tiny pair on CPU (announced in one line)."""
    if model and draft:
        return model, draft
    if device.type == "cuda":
        return model or HUB_TARGET, draft or HUB_DRAFT
    if announce:
        print("No CUDA device: using the embedded tiny target + draft pair (models/).", file=sys.stderr)
    return model or "embedded", draft or "embedded"


@dataclass
class ModelPair:
    target: torch.nn.Module
    draft: DFlashDraftModel | None
    tokenizer: object
    target_name: str
    draft_name: str | None
    device: torch.device
    dtype: torch.dtype


def load_pair(model_name: str, draft_name: str | None, device: torch.device, dtype_flag: str,
              trust_remote_code: bool = False) -> ModelPair:
    """Load the target (HF causal LM), its tokenizer and the DFlash draft; check they fit."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    dtype = resolve_dtype(dtype_flag, "bfloat16" if device.type == "cuda" else "float32")
    if model_name in ("embedded", "embedded-target") and not (EMBEDDED_TARGET / "config.json").exists():
        raise UserError("the embedded tiny target is missing (models/tiny-target)",
                        "restore it from git, or pass --model-name-or-path")
    folder = resolve_model_dir(model_name, "target model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        target = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype,
                                                      trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load the target from '{model_name}': {str(err).splitlines()[0]}",
                        "check the path; models with custom code need --trust-remote-code") from err
    target = target.to(device).eval()
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ \
            and sum(p.numel() for p in target.parameters()) < 100_000_000:
        torch.set_num_threads(1)  # small models are overhead-bound: threads only add sync cost
    draft = None
    if draft_name:
        if draft_name in ("embedded", "embedded-draft") and not (EMBEDDED_DRAFT / "config.json").exists():
            raise UserError("the embedded tiny draft is missing (models/tiny-draft)",
                            "restore it from git, or pass --draft-name-or-path")
        draft = DFlashDraftModel.from_pretrained(draft_name, dtype=dtype, device_map=device)
        draft.check_target(target)
    return ModelPair(target, draft, tokenizer, model_name, draft_name, device, dtype)


def stop_token_ids(pair: ModelPair) -> list[int]:
    ids = set()
    for src in (getattr(pair.target, "generation_config", None), pair.target.config):
        eos = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(e) for e in eos)
    if pair.tokenizer.eos_token_id is not None:
        ids.add(int(pair.tokenizer.eos_token_id))
    return sorted(ids)


def encode_chat(tokenizer, messages: list[dict], *, enable_thinking: bool = False,
                raw: bool = False) -> list[int]:
    """Token ids of a conversation, with the generation prompt, thinking off by default."""
    if raw or not getattr(tokenizer, "chat_template", None):
        text = "\n".join(m["content"] for m in messages)
        return tokenizer(text, add_special_tokens=True)["input_ids"]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         enable_thinking=enable_thinking)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------- environment
def environment_info(device: torch.device) -> dict:
    import transformers

    info = {
        "gpu_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cuda_version": torch.version.cuda if device.type == "cuda" else "none",
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device": str(device),
    }
    if device.type == "cpu":
        info["cpu_name"] = platform.processor() or platform.machine()
        info["torch_threads"] = torch.get_num_threads()
    return info


def sample_seed(seed: int, sample_id: str) -> int:
    """A per-sample seed independent of rank and order, so reruns and resumes match."""
    import zlib
    return (seed * 1_000_003 + zlib.crc32(sample_id.encode())) % (2**31)
