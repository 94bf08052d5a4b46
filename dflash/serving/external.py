"""Before a run: the --base-url server (ready? which mode does it serve?) and --dry-run (the
exact launch commands and the plan, nothing started or written)."""
from __future__ import annotations

import time
from dataclasses import dataclass

from ..errors import UserError
from .cli import LAUNCH_ENV_VAR, MODE_LABEL, MODES, Paths, n_prompts
from .client import RequestFailed, get_server_info, run_load
from .engines import Engine
from .servers import detect_gpu, filter_backends, shell_line
from .vllm import VLLM_ENV_VAR, block_size


@dataclass
class ExternalServer:
    url: str
    backend: str
    mode: str
    info: dict
    detected_from: str


def wait_ready(engine: Engine, url: str, args) -> None:
    t0 = time.monotonic()
    while True:
        ok, seen = engine.ready_once(url, min(30.0, args.timeout_s))
        if ok:
            return
        if time.monotonic() - t0 > args.timeout_s:
            raise UserError(f"the server at {url} was not ready after {args.timeout_s:g} s "
                            f"(last check: {seen})",
                            "check --base-url, or raise --timeout-s", exit_code=1)
        time.sleep(args.poll_interval_s)


def probe_request(engine: Engine, url: str, texts: list[str], args):
    """One short request: the protocol works (else exit 1 with the reason)."""
    try:
        return run_load(url, texts[:1], 1, args, "probe", engine.protocol(max_new_tokens=8))
    except RequestFailed as err:
        raise UserError(f"the server at {url}: first request failed: "
                        f"{str(err).split(' failed: ', 1)[-1]}", exit_code=1) from None


def probe_external(args, texts: list[str], engine: Engine | None = None) -> ExternalServer:
    """The --base-url server (found reachable by ``check_reachable``), before anything is
    written: ready (else exit 1 after --timeout-s), and which mode it serves (SGLang:
    /server_info, else one short probe request; vLLM / OpenAI: speculative-decoding counters
    at /metrics)."""
    from .engines import make_engine

    engine = engine or make_engine(args)
    url = args.base_url
    wait_ready(engine, url, args)
    if engine.name != "sglang":
        engine.discover_model(url)
        probe_request(engine, url, texts, args)
        counters = engine.spec_counters(url)
        mode = "dflash" if counters is not None else "baseline"
        found = ("speculative-decoding counters at /metrics" if counters is not None else
                 "no speculative-decoding counters at /metrics this client knows: taken as a "
                 "baseline server")
        return ExternalServer(url, "external", mode, {"model": engine.model}, found)
    info = get_server_info(url) or {}
    backend = str(info.get("attention_backend") or "external")
    if "speculative_algorithm" in info:
        return ExternalServer(url, backend, "dflash" if info.get("speculative_algorithm")
                              else "baseline", info, "server_info")
    probe = probe_request(engine, url, texts, args)
    verify = probe.results[0].verify_ct if probe.results else None
    return ExternalServer(url, backend, "dflash" if verify else "baseline", info,
                          "a probe request")


def dry_run(args, paths: Paths, engine: Engine, prefix: list[str] | None,
            overridden: bool) -> int:
    out = ["# benchmark_sglang.py --dry-run: nothing is started"]
    if args.engine != "sglang":
        out.append(f"# engine: {engine.title} (OpenAI /v1/completions, chat template applied "
                   f"here; acceptance from /metrics counter deltas)")
    if args.base_url:
        out.append(f"# no server is launched: benchmarking the running server at "
                   f"{args.base_url}")
    else:
        gpu = detect_gpu()
        backends, notes = engine.backends(), []
        if args.engine == "sglang":
            backends, notes = filter_backends(backends, gpu)
        if gpu.available:
            out.append(f"# GPU: {gpu.name} (SM {gpu.sm}), {gpu.count} visible")
        elif args.engine == "sglang":
            out.append(f"# GPU: none here ({gpu.reason}); on the GPU machine, attention "
                       f"backends it cannot run are dropped (fa3 needs SM 90, fa4 needs "
                       f"SM >= 100)")
        else:
            out.append(f"# GPU: none here ({gpu.reason}); vLLM needs one")
        out += [f"# {n}" for n in notes]
        if args.engine == "vllm":
            block, source = block_size(args)
            out.append(f"# block size {block} ({source}): num_speculative_tokens {block - 1}")
        if overridden:
            var = LAUNCH_ENV_VAR if args.engine == "sglang" else VLLM_ENV_VAR
            out.append(f"# launch command overridden ({var} / --server-cmd)")
        port = args.port if args.port else "<free port>"
        env_add = engine.launch_env()
        for backend in backends:
            for mode in MODES:
                if mode == "baseline" and args.skip_baseline:
                    continue
                out.append(f"# [{backend}] {MODE_LABEL[mode]} server")
                out.append(shell_line(engine.launch_command(mode, backend, port, prefix),
                                      env_add))
    sizes = ", ".join(f"c={c}: {n_prompts(args, c)}" for c in args.concurrency_list)
    flush = {"sglang": "GET /flush_cache", "vllm": "POST /reset_prefix_cache",
             "openai": "no cache reset"}[args.engine]
    out.append(f"# per server: for each concurrency, an untimed warm-up of c requests, then "
               f"n = min({args.questions_per_concurrency_base} * c, "
               f"{args.max_questions_per_config}) prompts of {args.dataset_name} with c in "
               f"flight ({sizes}); {flush} between configurations")
    out.append(f"# results: {paths.jsonl}; reports: {paths.md}, {paths.json}, {paths.png}")
    print("\n".join(out), flush=True)
    return 0
