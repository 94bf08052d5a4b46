"""The sharded run the three Transformers CLIs share.

``benchmark.py``, ``benchmark_dynamic_schedule.py`` and ``benchmark_multiround_spec.py`` differ
in what they measure per prompt and how they report it; everything around that is here: the
summary path, loading prompts and models, the conversation loop of a prompt's turns, and the
run skeleton (results log + barrier, resume split, graceful stop, the unit loop, gathering
every rank's records, the run status, the atomic summary write, leaving the group).
Each CLI hands :func:`run_sharded` its ``run_one(prompt)``, its warm-up and its report.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import common as bench
from . import units
from ..datasets import load_prompts
from ..errors import EXIT_FAILED
from ..runlog import GracefulStop, RunLog, atomic_write_json


def summary_path(args, default: str) -> str:
    """--output-json, else next to the JSONL, else ``default``."""
    if args.output_json:
        return args.output_json
    if args.save_outputs_path:
        return str(Path(args.save_outputs_path).with_suffix(".summary.json"))
    return default


def load_inputs(args, dist: bench.Dist, device: torch.device, model_name: str,
                draft_name: str | None):
    """(prompts, their source, the model pair): what every CLI loads after its prechecks."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    prompts, source = load_prompts(args.dataset, args.max_samples,
                                   offline_fallback=args.offline_fallback)
    if dist.main and source != "built-in" and not source.startswith(("cache", "hub")):
        print(f"Prompts of '{args.dataset}' from {source}.", file=sys.stderr)
    pair = bench.load_pair(model_name, draft_name, device, args.dtype, args.trust_remote_code)
    bench.chat_kwargs(pair.tokenizer, args)  # a --reasoning the template cannot take: one line
    return prompts, source, pair


def encode(pair, args, messages: list[dict]) -> torch.Tensor:
    """A conversation as a [1, n] id tensor on the pair's device (chat template, reasoning)."""
    ids = bench.encode_chat(pair.tokenizer, messages, template_kwargs=bench.chat_kwargs(
        pair.tokenizer, args), raw=args.no_chat_template)
    return torch.tensor([ids], device=pair.device)


def generate_turns(pair, prompt: dict, args, seed: int,
                   generate: Callable[[torch.Tensor, list[int], torch.Generator], object], *,
                   timed: bool = True):
    """Every turn of a prompt, later turns seeing the earlier replies -> (results, texts).
    ``generate(input_ids, stop_ids, generator)`` runs one turn; one generator (seeded with the
    sample's seed) serves all turns. ``timed``: without garbage-collector pauses."""
    stops = bench.stop_token_ids(pair)
    gen = torch.Generator(device=pair.device).manual_seed(seed)
    messages, results, texts = [], [], []
    for turn in prompt["turns"]:
        messages.append({"role": "user", "content": turn})
        input_ids = encode(pair, args, messages)
        if timed:
            with bench.no_gc_pauses():
                res = generate(input_ids, stops, gen)
        else:
            res = generate(input_ids, stops, gen)
        results.append(res)
        reply = pair.tokenizer.decode(res.output_ids, skip_special_tokens=True)
        texts.append(reply)
        messages.append({"role": "assistant", "content": reply})
    return results, texts


def engine_line(decoder) -> str:
    """What the results call the engine: the engine choice's own description when it has one
    (what was chosen and why), else its name."""
    return getattr(decoder.engines, "description", decoder.engine_name)


def resolve_engine(args, pair) -> tuple[str, str]:
    """(engine every decoder of the run gets, the line the summary calls it): ``--engine``
    resolved once for the target's family. The decoders get the concrete name, so that a
    fallback of ``auto`` (a family that needs another engine) is said once, in the summary,
    not also by every decoder's Engines (once per decoder and rank) on stderr."""
    from ..engine.select import choose_engine

    device = pair.target.get_input_embeddings().weight.device
    return choose_engine(args.engine, device, pair.target)


@dataclass
class Shard:
    """This rank's part of the run (for progress and verbose lines)."""
    mine: list[dict]
    todo: list[dict]
    records: list[dict]


def open_log(path: str | None, config: dict, resume: bool, dist: bench.Dist) -> RunLog | None:
    if not path:
        return None
    log = RunLog(path, config, resume=resume, write_header=dist.main)
    if dist.world > 1:
        import torch.distributed as tdist
        tdist.barrier()  # rank 0 wrote the header (or refused) before the others append
    return log


def run_sharded(args, dist: bench.Dist, prompts: Sequence[dict], config: dict, out_json: str, *,
                run_one: Callable[[dict], dict],
                summarize: Callable[[list[dict], dict], dict],
                report: Callable[[dict, str], None],
                warm_up: Callable[[list[dict]], None] | None = None,
                on_record: Callable[[Shard, int, dict, dict], None] | None = None,
                tag_rank: bool = True, progress: bool = False) -> int:
    """Run this rank's share of ``prompts`` unit by unit and write the summary on rank 0.

    ``summarize(records, status)`` builds the summary from every rank's records (dataset
    order) and :func:`units.run_status`; ``report(summary, path)`` prints it. ``warm_up``
    gets the prompts still to run (else all of this rank's). Returns the exit code: a
    failure re-raised by :func:`units.raise_failure`, 1 when any rank stopped on an error,
    130 / 143 after a signal, else 0."""
    log = open_log(args.save_outputs_path, config, args.resume, dist)
    mine = list(prompts[dist.rank::dist.world])
    todo, records = units.split_resumed(mine, log)
    resumed = len(records)
    if dist.main:
        units.announce_resumed(records, log)
    shard = Shard(mine, todo, records)
    bar = _progress(len(mine), len(records), dist) if progress else None

    def recorded(i, prompt, rec):
        if bar is not None:
            bar.update(1)
        if on_record is not None:
            on_record(shard, i, prompt, rec)

    with GracefulStop() as stop:  # SIGINT/SIGTERM: drop the unit in progress, keep the rest
        try:
            failure = units.run_units(
                todo, run_one, stop=stop, records=records, dataset=args.dataset, log=log,
                continue_on_error=args.continue_on_error,
                rank=dist.rank if tag_rank else None,
                warm_up=(lambda: warm_up(todo or mine)) if warm_up is not None else None,
                on_record=recorded)
        finally:
            if bar is not None:
                bar.close()
        everyone = bench.all_gather({"records": records, "signal": stop.signum,
                                     "failed": failure is not None, "resumed": resumed,
                                     "ignored": log.ignored_lines if log else 0}, dist)
        for part in everyone:  # every rank agrees on how the run ended
            if part["signal"] is not None:
                stop.note(part["signal"])
        stopped_on_error = any(part["failed"] for part in everyone)
        if dist.main:
            every = units.sort_like([r for part in everyone for r in part["records"]], prompts)
            status = units.run_status(every, len(prompts), interrupted_by=stop.signal_name,
                                      stopped_on_error=stopped_on_error,
                                      resumed=sum(part["resumed"] for part in everyone),
                                      ignored_lines=everyone[0]["ignored"])
            summary = summarize(every, status)
            atomic_write_json(out_json, summary)
            report(summary, out_json)
        bench.barrier_and_close(dist, barrier=not stop.requested)
    units.raise_failure(failure)
    if stopped_on_error:
        return EXIT_FAILED
    return stop.exit_code()


def _progress(total, done, dist):
    try:
        from tqdm import tqdm
        return tqdm(total=total, initial=done, desc=f"samples (rank {dist.rank})" if dist.world > 1
                    else "samples", disable=not dist.main and dist.world > 1, file=sys.stderr,
                    dynamic_ncols=True)
    except ImportError:  # pragma: no cover
        class _Null:
            def update(self, n): pass
            def close(self): pass
        return _Null()
