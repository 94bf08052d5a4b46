"""Shared plumbing of the benchmark CLIs: models, prompts, distributed ranks, metrics, reports."""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import reasoning, runlog
from ..datasets import DATASET_NAMES, check_dataset_name
from ..decoding.quickstart import DFlashDraftModel
from ..decoding.sampling import check_sampling
from ..model.draft import DTYPES, resolve_dtype
from ..errors import UserError
from ..model.hub import EMBEDDED_DRAFT, EMBEDDED_TARGET, looks_like_hub_id, resolve_model_dir
from .plan import HUB_DRAFT, HUB_TARGET  # the one copy (in the torch-free plan)


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
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="sampling keeps the most likely tokens up to this probability mass, "
                             "in target and draft alike (0 < p <= 1; default 1 = off)")
    parser.add_argument("--top-k", type=int, default=0,
                        help="sampling keeps the k most likely tokens (default 0 = off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto",
                        help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16")
    parser.add_argument("--engine", default="auto", choices=["auto", "fast", "static", "hf"],
                        help="static: preallocated KV cache (+CUDA graphs on GPU); hf: plain eager "
                             "Transformers reference path")
    parser.add_argument("--reasoning", default=None,
                        help="off, on (the chat template's enable_thinking) or a reasoning level "
                             "the template names as reasoning_effort / reasoning_strength (e.g. "
                             "high); default off")
    add_switches(parser, [
        ("--enable-thinking", "the same as --reasoning on (Qwen3 thinking mode; off by default)"),
        ("--no-chat-template", "feed the raw prompt text instead of applying the chat template"),
        ("--offline-fallback", "if a hub dataset is out of reach, use the built-in set of its "
                               "category")])
    parser.add_argument("--save-outputs-path", default=None,
                        help="per-sample JSONL, appended as each sample finishes")
    parser.add_argument("--output-json", default=None, help="summary JSON (default: next to the JSONL, "
                                                            "or outputs/<script>_<dataset>.json)")
    add_switches(parser, [
        ("--resume", "skip samples already in --save-outputs-path for the same configuration"),
        ("--continue-on-error", "record a failing sample (e.g. out of memory) and go on"),
        ("--trust-remote-code", "allow model repos to run their own code (never on by default)"),
        ("--verbose", "show tracebacks on errors")])


def add_switches(parser, switches) -> None:
    """On/off flags (``store_true``), given as (flag, help) pairs."""
    for flag, text in switches:
        parser.add_argument(flag, action="store_true", help=text)


DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
DTYPE_NAMES = ("auto",) + tuple(DTYPES)
MAX_NEW_TOKENS_LIMIT = 1_000_000


def check_common_args(args) -> None:
    """Validate before any model is loaded: one clear line per problem, nothing written."""
    check_dataset_name(args.dataset)
    if args.max_samples is not None and args.max_samples < 1:
        raise UserError(f"--max-samples must be >= 1, got {args.max_samples}")
    if not 1 <= args.max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
        raise UserError(f"--max-new-tokens must be in 1..{MAX_NEW_TOKENS_LIMIT}, "
                        f"got {args.max_new_tokens}")
    check_sampling(args.temperature, args.top_p, args.top_k)
    _, explicit = reasoning_of(args)
    if explicit and args.reasoning is not None and args.no_chat_template:
        raise UserError("--reasoning needs the chat template", "drop --no-chat-template")
    if not 0 <= args.seed < 2**63:
        raise UserError(f"--seed must be in 0..2^63-1, got {args.seed}")
    check_device_flag(args.device)
    if args.dtype not in DTYPE_NAMES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPE_NAMES)}, got '{args.dtype}'")
    check_model_arg(args.model_name_or_path, "--model-name-or-path", "target model")
    check_model_arg(args.draft_name_or_path, "--draft-name-or-path", "draft")
    jsonl, summary = args.save_outputs_path, args.output_json
    for flag, value in (("--save-outputs-path", jsonl), ("--output-json", summary)):
        if value is not None:
            check_writable(value, flag)
    if jsonl and summary and Path(jsonl).expanduser().resolve() == Path(summary).expanduser().resolve():
        raise UserError("--output-json and --save-outputs-path are the same file",
                        "give the summary its own path")
    runlog.precheck(jsonl, None, args.resume)


def check_device_flag(flag: str) -> None:
    if not DEVICE_PATTERN.match(flag or ""):
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got '{flag}'")
    if flag.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {flag} requested but CUDA is not available",
                            "use --device cpu (or auto)")
        if ":" in flag and int(flag.split(":")[1]) >= torch.cuda.device_count():
            raise UserError(f"--device {flag}: only {torch.cuda.device_count()} CUDA device(s) "
                            "visible", "check CUDA_VISIBLE_DEVICES")


def check_model_arg(name: str | None, flag: str, what: str) -> None:
    """A model flag that names a local folder must be a model folder; an 'embedded' alias
    needs the embedded pair. Hub ids are checked when they are fetched."""
    if name is None:
        return
    if not name.strip():
        raise UserError(f"{flag} is empty", "give a local model folder, a hub id or 'embedded'")
    draft = what == "draft"
    if name in ("embedded", "embedded-draft" if draft else "embedded-target"):
        folder, rel = (EMBEDDED_DRAFT, "models/tiny-draft") if draft else \
            (EMBEDDED_TARGET, "models/tiny-target")
        if not (folder / "config.json").exists():
            raise UserError(f"{flag} {name}: the embedded tiny {'draft' if draft else 'target'} "
                            f"is missing ({rel})", "build it with scripts/train_embedded.sh, "
                            "or pass a model folder or hub id")
        return
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{flag}: {what} directory '{name}' has no config.json",
                            "point to a Hugging Face model folder")
        return
    if path.exists():
        raise UserError(f"{flag}: {what} path '{name}' is a file, not a model folder")
    if not looks_like_hub_id(name):
        raise UserError(f"{flag}: {what} '{name}' does not exist",
                        "give a local model folder, a hub id like Qwen/Qwen3-4B, or 'embedded'")


def local_config(name: str | None, what: str = "draft") -> dict | None:
    """config.json of a model that is on disk (a folder or an 'embedded' alias), else None."""
    if not name:
        return None
    if name in ("embedded", "embedded-draft" if what == "draft" else "embedded-target"):
        path = (EMBEDDED_DRAFT if what == "draft" else EMBEDDED_TARGET) / "config.json"
    else:
        path = Path(name).expanduser() / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


check_writable = runlog.check_writable  # (lives in runlog: the torch-free CLIs use it too)


# ----------------------------------------------------------------------------- failures
def is_out_of_memory(err: BaseException) -> bool:
    """CUDA out of memory, or the host allocator giving up."""
    if isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in text.lower()
                                              or "can't allocate memory" in text)


@contextlib.contextmanager
def no_gc_pauses():
    """A timed generation without Python's cyclic garbage collector: a full collection of a
    process holding a model's worth of objects takes ~0.1-0.2 s, as long as hundreds of
    decoding cycles of a small pair on a GPU, and lands on whichever mode is running
    (what timeit does too). The young generations are collected before (well under a
    millisecond; a full collection each time would add that 0.1-0.2 s per generation to the
    run's wall time), and the collector is re-enabled after."""
    gc.collect(1)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def free_memory() -> None:
    """Give back what a failed unit held (cached CUDA blocks, Python garbage)."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def error_text(err: BaseException) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    kind = "out of memory" if is_out_of_memory(err) else type(err).__name__
    return f"{kind}: {first}" if first else kind


# ----------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_from_env() -> Dist:
    """This process's place in a torchrun launch, read from the environment (no group yet)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    return Dist(rank=int(os.environ.get("RANK", "0")), world=world,
                local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed(device_flag: str) -> Dist:
    """Join the torchrun group if launched by torchrun (NCCL on GPUs, gloo on CPU)."""
    d = dist_from_env()
    if d.world <= 1:
        return d
    import torch.distributed as dist

    rank, world, local = d.rank, d.world, d.local_rank
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


def all_gather(obj, d: Dist) -> list:
    """Every rank's ``obj`` on every rank (so all ranks agree on how a run ended)."""
    if d.world == 1:
        return [obj]
    import torch.distributed as dist

    everything = [None] * d.world
    dist.all_gather_object(everything, obj)
    return everything


def barrier_and_close(d: Dist, barrier: bool = True) -> None:
    """Leave the torchrun group (after a barrier, unless the run is being interrupted)."""
    if d.world > 1:
        import torch.distributed as dist
        if dist.is_initialized():
            if barrier:
                dist.barrier()
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- models
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


def check_no_remote_code(folder: Path, name: str) -> None:
    """Refuse, in one line, a model that only its own shipped code can load: that code runs
    only with --trust-remote-code. (A repo with an ``auto_map`` whose architecture
    Transformers knows loads with the built-in classes; its code is never run.)"""
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not cfg.get("auto_map"):
        return
    from transformers import CONFIG_MAPPING

    if cfg.get("model_type") not in CONFIG_MAPPING:
        raise UserError(f"model '{name}' needs its own code (auto_map, model_type "
                        f"'{cfg.get('model_type')}'), which is never run by default",
                        "pass --trust-remote-code if you trust that repository")


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
    if not trust_remote_code:
        check_no_remote_code(folder, model_name)
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
                raw: bool = False, template_kwargs: dict | None = None) -> list[int]:
    """Token ids of a conversation, with the generation prompt, thinking off by default
    (``template_kwargs``, from :func:`chat_kwargs`, replace ``enable_thinking``)."""
    if raw or not getattr(tokenizer, "chat_template", None):
        text = "\n".join(m["content"] for m in messages)
        return tokenizer(text, add_special_tokens=True)["input_ids"]
    if template_kwargs is None:
        template_kwargs = {"enable_thinking": enable_thinking}
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         **template_kwargs)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def reasoning_of(args) -> tuple[str, bool]:
    """(the --reasoning setting, given explicitly), --enable-thinking counting as ``on``."""
    return reasoning.resolve(getattr(args, "reasoning", None),
                             getattr(args, "enable_thinking", False))


def chat_kwargs(tokenizer, args) -> dict:
    """The chat-template arguments of the run's --reasoning setting for this tokenizer (one
    line when its template cannot take an explicit setting)."""
    if getattr(args, "no_chat_template", False) or not getattr(tokenizer, "chat_template", None):
        return {}
    setting, explicit = reasoning_of(args)
    return reasoning.template_kwargs(setting, tokenizer.chat_template, explicit)


def sampling_kwargs(args) -> dict:
    """``top_p`` / ``top_k`` of the run, for the decoders' ``generate``."""
    return {"top_p": args.top_p, "top_k": args.top_k}


def sampling_text(cfg: dict) -> str:
    """``T=1.0`` (and the filters that are on, and a reasoning setting other than off) for the
    summary's title line."""
    text = f"T={cfg['temperature']}"
    if cfg.get("top_p", 1.0) != 1.0:
        text += f", top-p {cfg['top_p']}"
    if cfg.get("top_k"):
        text += f", top-k {cfg['top_k']}"
    if cfg.get("reasoning", "off") != "off":
        text += f", reasoning {cfg['reasoning']}"
    return text


def title_lines(s: dict, name: str, tail: str, draft_note: str = "") -> list[str]:
    """The first two lines of a CLI's printed summary: what ran, on which models and engine."""
    cfg = s["config"]
    return [f"== {name}: {cfg['dataset']} ({s['samples_done']} samples, {cfg['max_new_tokens']} "
            f"max new tokens, {sampling_text(cfg)}, {tail}) ==",
            f"target {cfg['model']} | draft {cfg['draft']}{draft_note} | {cfg['dtype']} | "
            f"engine {s.get('engine') or cfg['engine']}"]


def run_settings(args) -> dict:
    """The sampling and reasoning settings every result's config records."""
    return {"top_p": args.top_p, "top_k": args.top_k, "reasoning": reasoning_of(args)[0]}


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
    try:
        import triton
        info["triton_version"] = triton.__version__
    except ImportError:  # CPU wheels of torch ship none
        pass
    if device.type == "cuda":
        from ..engine.cuda.gemm_configs import driver_version
        info["driver_version"] = driver_version()
    if device.type == "cpu":
        info["cpu_name"] = platform.processor() or platform.machine()
        info["torch_threads"] = torch.get_num_threads()
    return info


def sample_seed(seed: int, sample_id: str) -> int:
    """A per-sample seed independent of rank and order, so reruns and resumes match."""
    import zlib
    return (seed * 1_000_003 + zlib.crc32(sample_id.encode())) % (2**31)


def reserve_for_prompts(decoder, pair, prompts, args, extra: int = 64) -> None:
    """Size the decoder's caches for the longest conversation up front, before warm-up.

    Growing the caches mid-run rebuilds the engine (and re-captures its CUDA graphs), which
    would land inside a timed sample."""
    longest = 0
    kwargs = chat_kwargs(pair.tokenizer, args)
    for p in prompts:
        turns = [{"role": "user", "content": t} for t in p["turns"]]
        ids = encode_chat(pair.tokenizer, turns, template_kwargs=kwargs,
                          raw=getattr(args, "no_chat_template", False))
        longest = max(longest, len(ids) + len(p["turns"]) * args.max_new_tokens)
    decoder.reserve(longest + extra)
