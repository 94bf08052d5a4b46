"""Issue 21's CLI part: --top-p / --top-k (and TOP_P / TOP_K in the wrappers), --reasoning
(with --enable-thinking as its alias), and what the result JSON records of them."""
from __future__ import annotations

import json
import shutil

import pytest

from dflash import reasoning
from dflash.bench import benchmark_cli, dynamic_cli, multiround_cli
from dflash.decoding.loop import SpeculativeDecoder
from dflash.decoding.multiround import MultiRoundDecoder
from dflash.errors import UserError, run_cli

from test_robustness import MAINS, _cli_argv, _forbid_model_loading, _set
from test_wrappers import plan

CLIS = ["benchmark", "dynamic", "multiround"]
BAD = [
    ([("--top-p", "0")], "--top-p must be in (0, 1]"),
    ([("--top-p", "1.5")], "--top-p must be in (0, 1]"),
    ([("--top-p", "-0.1")], "--top-p must be in (0, 1]"),
    ([("--top-p", "nan")], "--top-p must be in (0, 1]"),
    ([("--top-p", "x")], "--top-p: invalid float value"),
    ([("--top-k", "-1")], "--top-k must be an integer >= 0"),
    ([("--top-k", "2.5")], "--top-k: invalid int value"),
    ([("--reasoning", "very high")], "--reasoning must be off, on or a reasoning level"),
    ([("--reasoning", "off"), ("+", ["--enable-thinking"])], "contradicts --reasoning off"),
    ([("--reasoning", "high"), ("+", ["--no-chat-template"])], "--reasoning needs the chat"),
]


@pytest.mark.parametrize("cli", CLIS)
@pytest.mark.parametrize("edits, needle", BAD)
def test_bad_sampling_and_reasoning_flags_are_one_line(cli, edits, needle, toy_pair, tmp_path,
                                                       capsys, monkeypatch):
    """Refused before any model loads: one line, non-zero exit, nothing written."""
    monkeypatch.delenv("DFLASH_VERBOSE", raising=False)
    _forbid_model_loading(monkeypatch)
    out = tmp_path / "out"
    out.mkdir()
    argv = _cli_argv(cli, toy_pair, out)
    for flag, value in edits:
        argv = argv + value if flag == "+" else _set(argv, flag, value)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run_cli(MAINS[cli], argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_.value.code not in (0, None)
    assert len(lines) == 1 and needle in lines[0], lines
    assert list(out.iterdir()) == []


def test_wrappers_pass_top_p_and_top_k():
    base = {"NPROC": 1, "MODEL": "m", "DRAFT": "d", "TASKS": "aime25:2"}
    unset = plan("benchmark", **base).runs[0].cmd
    assert "--top-p" not in unset and "--top-k" not in unset   # the commands as before
    for kind, extra in (("benchmark", {}), ("sweep", {"DATASET": "aime25"})):
        env = {**base, **extra, "TEMPERATURE": 1, "TOP_P": "0.9", "TOP_K": "50"}
        if kind == "sweep":
            env.pop("TASKS")
        p = plan(kind, **env)
        cmd = p.runs[0].cmd
        assert cmd[cmd.index("--top-p") + 1] == "0.9" and cmd[cmd.index("--top-k") + 1] == "50"
        assert p.settings["top_p"] == 0.9 and p.settings["top_k"] == 50
    for env, needle in (({"TOP_P": "0"}, "TOP_P='0' must be in (0, 1]"),
                        ({"TOP_P": "1.01"}, "must be in (0, 1]"),
                        ({"TOP_P": "high"}, "TOP_P='high' is not a number"),
                        ({"TOP_K": "-1"}, "TOP_K='-1' must be >= 0"),
                        ({"TOP_K": "1.5"}, "TOP_K='1.5' is not an integer")):
        with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)")
                           .replace("[", r"\[").replace("]", r"\]")):
            plan("benchmark", **base, **env)


# ----------------------------------------------------------------------------- reasoning
QWEN3 = "{% if enable_thinking is defined and enable_thinking is false %}<think></think>{% endif %}"
EFFORT = "{{ reasoning_effort | default('medium') }}"
STRENGTH = "{{ reasoning_strength }} {{ reasoning_effort }}"


def test_reasoning_maps_to_template_arguments_as_the_reference():
    assert reasoning.resolve(None, False) == ("off", False)       # the benchmarks' default
    assert reasoning.resolve(None, True) == ("on", True)          # --enable-thinking alias
    assert reasoning.resolve("ON", False) == ("on", True)
    assert reasoning.resolve("high", False) == ("high", True)
    with pytest.raises(UserError, match="contradicts --reasoning high"):
        reasoning.resolve("high", True)
    assert reasoning.template_kwargs("on", QWEN3) == {"enable_thinking": True}
    assert reasoning.template_kwargs("off", QWEN3) == {"enable_thinking": False}
    assert reasoning.template_kwargs("high", EFFORT) == {"reasoning_effort": "high"}
    assert reasoning.template_kwargs("low", STRENGTH) == {"reasoning_strength": "low"}
    # the default never refuses a template (it ignores enable_thinking=False)
    assert reasoning.template_kwargs("off", "{{ messages }}", explicit=False) == \
        {"enable_thinking": False}
    with pytest.raises(UserError, match="no enable_thinking switch"):
        reasoning.template_kwargs("on", EFFORT)
    with pytest.raises(UserError, match="names no reasoning level") as err:
        reasoning.template_kwargs("high", QWEN3)
    assert "(use --reasoning on or off)" in err.value.one_line()


@pytest.fixture(scope="module")
def effort_pair(toy_pair, tmp_path_factory):
    """The toy pair whose target's chat template names reasoning_effort."""
    target, draft = toy_pair
    copy = tmp_path_factory.mktemp("effort") / "target"
    shutil.copytree(target, copy)
    template = ("{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
                "{% if reasoning_effort is defined %}effort {{ reasoning_effort }}\n{% endif %}")
    (copy / "chat_template.jinja").write_text(template)
    cfg_path = copy / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    return copy, draft


def _run(main, argv) -> dict:
    assert main(argv) == 0
    return json.loads(open(argv[argv.index("--output-json") + 1]).read())


def test_reasoning_level_reaches_the_prompt_and_the_record(effort_pair, tmp_path, capsys):
    target, draft = effort_pair
    base = ["--dataset", "builtin-code", "--max-samples", "1", "--max-new-tokens", "4",
            "--model-name-or-path", str(target), "--draft-name-or-path", str(draft),
            "--block-size", "4", "--warmup-runs", "0"]
    plain = _run(benchmark_cli.main, base + ["--output-json", str(tmp_path / "a.json")])
    high = _run(benchmark_cli.main, base + ["--output-json", str(tmp_path / "b.json"),
                                            "--reasoning", "high"])
    assert plain["config"]["reasoning"] == "off" and high["config"]["reasoning"] == "high"
    # "effort high\n" is in the prompt only when asked for
    assert high["per_sample"][0]["prompt_tokens"] > plain["per_sample"][0]["prompt_tokens"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run_cli(benchmark_cli.main, base + ["--output-json", str(tmp_path / "c.json"),
                                            "--enable-thinking"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_.value.code == 2 and len(err) == 1
    assert "--reasoning on: the target's chat template has no enable_thinking switch" in err[0]


# ----------------------------------------------------------------------------- records
@pytest.fixture
def spy(monkeypatch):
    """Every decoder generate call's (temperature, top_p, top_k)."""
    calls = []
    for cls in (SpeculativeDecoder, MultiRoundDecoder):
        original = cls.generate

        def generate(self, *a, _original=original, **kw):
            calls.append((kw.get("temperature"), kw.get("top_p"), kw.get("top_k")))
            return _original(self, *a, **kw)

        monkeypatch.setattr(cls, "generate", generate)
    return calls


@pytest.mark.parametrize("cli", CLIS)
def test_top_p_top_k_reach_every_generation_and_the_result(cli, toy_pair, tmp_path, spy):
    out = tmp_path / "out"
    out.mkdir()
    argv = _cli_argv(cli, toy_pair, out)
    for flag, value in (("--max-samples", "1"), ("--max-new-tokens", "6"),
                        ("--warmup-runs", "1"), ("--temperature", "1.0"), ("--top-p", "0.9"),
                        ("--top-k", "5")):
        argv = _set(argv, flag, value)
    main = {"benchmark": benchmark_cli.main, "dynamic": dynamic_cli.main,
            "multiround": multiround_cli.main}[cli]
    summary = _run(main, argv)
    assert spy and set(spy) == {(1.0, 0.9, 5)}, spy
    cfg = summary["config"]
    assert (cfg["top_p"], cfg["top_k"], cfg["reasoning"]) == (0.9, 5, "off")
    assert isinstance(summary["engine"], str) and summary["engine"]
    header = json.loads((out / "r.jsonl").read_text().splitlines()[0])
    assert header["config"]["top_p"] == 0.9 and header["config"]["top_k"] == 5


# ----------------------------------------------------------------------------- every CLI
ENTRIES = ["benchmark.py", "benchmark_dynamic_schedule.py", "benchmark_multiround_spec.py",
           "benchmark_sglang.py", "run_benchmark.sh", "run_block_sweep.sh"]
# (flag, env var, bad value): what each entry is given; the one line names the option
SAMPLING_BAD = [("--top-p", "TOP_P", "0"), ("--top-p", "TOP_P", "1.5"),
                ("--top-k", "TOP_K", "-1"), ("--temperature", "TEMPERATURE", "-1")]


@pytest.mark.parametrize("flag, var, bad", SAMPLING_BAD)
@pytest.mark.parametrize("entry", ENTRIES)
def test_every_cli_refuses_bad_sampling_values_in_one_line(entry, flag, var, bad, toy_pair,
                                                           tmp_path, capsys, monkeypatch):
    """top_p outside (0, 1], top_k < 0, temperature < 0: one line naming the option, a
    non-zero exit, before any model loads or server starts. The Transformers CLIs and
    benchmark_sglang.py run in-process (their scripts only call run_cli(main)); the wrappers
    as processes, with the variable set."""
    monkeypatch.delenv("DFLASH_VERBOSE", raising=False)
    if entry.endswith(".sh"):
        from test_wrappers import wrapper
        env = {"MODEL": "m", "DRAFT": "d", "NPROC": 1, var: bad, "LOG_DIR": tmp_path}
        env.update({"DATASET": "aime25"} if entry == "run_block_sweep.sh"
                   else {"TASKS": "aime25:2"})
        res = wrapper(entry, env, timeout=60)
        code, err, named = res.returncode, res.stderr, f"{var}='{bad}'"
        assert not list(tmp_path.iterdir())   # nothing run, nothing written
    else:
        _forbid_model_loading(monkeypatch)
        out = tmp_path / "out"
        out.mkdir()
        if entry == "benchmark_sglang.py":
            from dflash.serving import sglang as serving
            main = serving.main
            argv = ["--base-url", "http://127.0.0.1:9", "--connect-wait-s", "0",
                    "--no-chat-template", "--output-md", str(out / "r.md"), flag, bad]
        else:
            cli = {"benchmark.py": "benchmark", "benchmark_dynamic_schedule.py": "dynamic",
                   "benchmark_multiround_spec.py": "multiround"}[entry]
            main = MAINS[cli]
            argv = _set(_cli_argv(cli, toy_pair, out), flag, bad)
            if flag != "--temperature":
                argv = _set(argv, "--temperature", "1.0")
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            run_cli(main, argv)
        code, err, named = exit_.value.code, capsys.readouterr().err, flag
        assert list(out.iterdir()) == []
    lines = [line for line in err.splitlines() if line.strip()]
    assert code not in (0, None)
    assert len(lines) == 1, lines
    assert ": error: " in lines[0] and named in lines[0] and "must be" in lines[0], lines
