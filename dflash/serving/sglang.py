"""SGLang (and vLLM / OpenAI-compatible) DFlash throughput benchmark: launch servers, sweep
concurrency, report.

For every attention backend the GPU can run, this launches ``python -m sglang.launch_server``
twice (baseline, then ``--speculative-algorithm DFLASH``), waits until the server is ready,
warms it up, and for every concurrency ``c`` sends ``n = min(base * c, max_per_config)``
prompts with exactly ``c`` requests in flight. It measures output tokens/s, requests/s,
latency percentiles (TTFT/TPOT with ``--stream``) and the acceptance length that SGLang reports
per request (``meta_info.spec_accept_length``), and writes a Markdown report, a JSON report,
a PNG plot and a JSONL log of every finished configuration (``--resume`` continues from it).

``--engine vllm`` does the same with ``vllm serve`` (OpenAI ``/v1/completions``, acceptance
from the ``/metrics`` counters); ``--engine openai`` benchmarks any OpenAI-compatible server at
``--base-url`` (llama.cpp's llama-server...). ``--base-url`` benchmarks a server that is
already running (no sglang, no GPU needed here). The client is async httpx.
``transformers`` is used for the chat template, ``matplotlib`` for the plot, ``torch`` only to
look at the GPU (and only when servers are launched). The launch command prefix
(``python -m sglang.launch_server``) can be replaced with ``DFLASH_SGLANG_LAUNCH_CMD`` or the
hidden ``--server-cmd`` flag (the tests point it at ``tests/serving/fake_sglang_server.py``).

The work is split by job: :mod:`.cli` (flags), :mod:`.prompts`, :mod:`.servers` (processes),
:mod:`.client` (HTTP and the async load generator), :mod:`.protocols` (request and answer
per engine), :mod:`.engines`, :mod:`.vllm` (its launch), :mod:`.prometheus` (acceptance from
/metrics), :mod:`.external` (--base-url probe, --dry-run), :mod:`.report` (metrics, Markdown/JSON/plot), :mod:`.store`
(the results log), :mod:`.run` (the run itself). This module is the entry point and keeps the
names callers used before the split.
"""
from __future__ import annotations

from .cli import (DEFAULT_BACKENDS, ENGINES, IDENTITY_KEYS, KNOWN_BACKENDS,  # noqa: F401
                  LAUNCH_ENV_VAR, MODE_LABEL, MODES, Paths, build_parser, identity_of,
                  n_prompts, output_paths, parse_args, parse_backends, validate)
from .client import (LoadRun, RequestFailed, RequestResult, check_reachable,  # noqa: F401
                     check_ready_once, flush_cache, get_server_info, http_call, run_load)
from .engines import make_engine  # noqa: F401
from .prometheus import acceptance_delta, spec_counters  # noqa: F401
from .prompts import apply_chat_template, build_prompts, load_chat_tokenizer  # noqa: F401
from .protocols import OpenAIProtocol, SGLangProtocol, read_meta, sampling_params  # noqa: F401
from .report import Reporter, percentile, summarize  # noqa: F401
from .run import Benchmark, cli, dry_run, main, probe_external  # noqa: F401
from .servers import (GpuInfo, ServerProcess, backend_requirement,  # noqa: F401
                      check_launch_environment, detect_gpu, filter_backends, launch_command,
                      launch_prefix, stop_all_servers)
from .store import ResultStore  # noqa: F401
from .vllm import VLLM_ENV_VAR  # noqa: F401

__all__ = ["cli", "main"]
