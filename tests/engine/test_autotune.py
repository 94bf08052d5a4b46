"""First-use tuning of the skinny GEMM configs (dflash/engine/cuda/autotune.py): cache naming
and round trip, shape discovery, the selection logic and budget with a fake timer (CPU); one
real tuning run on CUDA."""
import contextlib
import json
import types

import pytest
import torch

from dflash.engine.cuda import autotune, gemm_configs, kernels

GPU = "NVIDIA L40S"


@pytest.fixture(autouse=True)
def tuning_on(monkeypatch):
    """conftest.py turns first-use tuning off for the rest of the suite; on here."""
    monkeypatch.delenv("DFLASH_AUTOTUNE", raising=False)


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty cache dir, fixed versions, no memory of earlier tuning; caches cleared after."""
    monkeypatch.setenv("DFLASH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(gemm_configs, "driver_version", lambda: "580.1")
    monkeypatch.setattr(gemm_configs, "_tables", {})
    monkeypatch.setattr(autotune, "_attempted", set())
    monkeypatch.setattr(gemm_configs, "_warned", set())
    gemm_configs.tuned_table.cache_clear()
    gemm_configs.config_for.cache_clear()
    yield tmp_path
    gemm_configs.tuned_table.cache_clear()
    gemm_configs.config_for.cache_clear()


@pytest.fixture
def fake_gpu(monkeypatch, fresh):
    """A CUDA-looking torch (an L40S, 142 SMs) and Triton present; nothing runs on it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: GPU)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index=None: types.SimpleNamespace(multi_processor_count=142))
    monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
    monkeypatch.setattr(kernels, "triton", types.SimpleNamespace(__version__="3.6.0"))
    monkeypatch.setattr(gemm_configs, "_triton_version", lambda: "3.6.0")
    monkeypatch.setattr(kernels, "ENABLED", True)
    return fresh


def fake_timer(best=None, cublas=100.0, worst=200.0):
    """timer(cfg, m): ``best`` configs get their time (us), cuBLAS ``cublas``, others ``worst``."""
    best = best or {}
    calls = []

    def timer(cfg, m):
        calls.append((cfg, m))
        return cublas if cfg is None else best.get(cfg, worst)
    timer.calls = calls
    return timer


# ----------------------------------------------------------------------------- cache
def test_cache_root_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("DFLASH_CACHE_DIR", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert gemm_configs.cache_root() == tmp_path / "a"
    monkeypatch.delenv("DFLASH_CACHE_DIR")
    assert gemm_configs.cache_root() == tmp_path / "xdg" / "dflash"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert gemm_configs.cache_root() == tmp_path / "home" / ".cache" / "dflash"


def test_cache_key_names_gpu_driver_triton_torch(fake_gpu, monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")
    path = gemm_configs.cache_path("NVIDIA L40S")
    assert path.parent == fake_gpu / "cache" / "skinny_gemm"
    assert path.name == "nvidia-l40s__driver-580.1__triton-3.6.0__torch-2.11.0-cu130.json"


def test_store_round_trip(fake_gpu):
    table = {(4096, 4096): (64, 128, 8, 4, 4), (151936, 4096): None}
    path = gemm_configs.store(GPU, table)
    doc = json.loads(path.read_text())
    assert doc["gpu"] == GPU and doc["driver"] == "580.1" and doc["triton"] == "3.6.0"
    assert doc["configs"] == {"4096,4096": [64, 128, 8, 4, 4], "151936,4096": None}
    assert not list(path.parent.glob(".*tmp"))  # atomic: no temporary left behind
    gemm_configs._tables.clear()  # a new process
    assert gemm_configs.cached_table(GPU) == table
    gemm_configs.store(GPU, {(1024, 4096): (32, 128, 4, 4, 4)})  # merges
    gemm_configs._tables.clear()
    assert len(gemm_configs.cached_table(GPU)) == 3


@pytest.mark.parametrize("text", ["{not json", '{"configs": {"1,2": [1, 2]}}', '[1, 2]'])
def test_corrupt_cache_ignored_with_one_warning(fake_gpu, capsys, text):
    path = gemm_configs.cache_path(GPU)
    path.parent.mkdir(parents=True)
    path.write_text(text)
    assert gemm_configs.cached_table(GPU) == {}
    gemm_configs._tables.clear()
    assert gemm_configs.cached_table(GPU) == {}
    assert capsys.readouterr().err.count("ignoring the GEMM tuning cache") == 1


def test_unwritable_cache_keeps_configs_in_memory(fake_gpu, monkeypatch, capsys):
    blocker = fake_gpu / "file"
    blocker.write_text("")
    monkeypatch.setenv("DFLASH_CACHE_DIR", str(blocker / "sub"))  # a dir under a file
    gemm_configs.store(GPU, {(4096, 4096): (64, 128, 8, 4, 4)})
    assert "cannot write the GEMM tuning cache" in capsys.readouterr().err
    assert gemm_configs.cached_table(GPU) == {(4096, 4096): (64, 128, 8, 4, 4)}


# ----------------------------------------------------------------------------- shapes
def tiny_pair():
    """Qwen3 target (hidden 96, 4 heads of 24, 1 KV head, 3 layers, vocab 200) + 2-layer draft."""
    from dflash.model.toy import make_random_draft, make_random_target

    target = make_random_target(vocab_size=200, hidden_size=96, num_layers=3, num_kv_heads=1,
                                dtype=torch.bfloat16)
    return target, make_random_draft(target, num_layers=2, dtype=torch.bfloat16)


def test_decode_shapes_tiny_qwen3_and_draft():
    target, draft = tiny_pair()
    shapes = {s.key: (s.roles, s.count) for s in autotune.decode_shapes([target, draft])}
    assert shapes == {
        (144, 96): ({"qkv"}, 5), (96, 96): ({"o"}, 5), (576, 96): ({"gate_up"}, 5),
        (96, 288): ({"down"}, 5), (200, 96): ({"lm_head"}, 1),  # the draft uses the target's
        (96, 2 * 96): ({"fc"}, 1), (48, 96): ({"kv"}, 2)}       # 2 features; k/v per layer
    order = [s.key for s in autotune.decode_shapes([target, draft])]
    assert order[0] == (576, 96)  # most bytes per step first


def test_decode_shapes_skip_moe_experts():
    from tests.engine.families import make_family_target

    for family in ("qwen3_moe", "gpt_oss"):
        shapes = autotune.decode_shapes([make_family_target(family, dtype=torch.float32)])
        roles = {s.key: s.roles for s in shapes}
        assert set().union(*roles.values()) == {"qkv", "o", "lm_head", "router"}, family
        assert roles[(4, 64)] == {"router"}  # 4 experts x hidden 64; experts (3-D) skipped


# ----------------------------------------------------------------------------- selection
LM = autotune.GemmShape(151936, 4096, {"lm_head"}, 1)


def test_candidates_respect_roles():
    gu = autotune.GemmShape(24576, 4096, {"gate_up"}, 36)
    for shape in (gu, autotune.GemmShape(6144, 4096, {"qkv"}, 36), LM):
        coarse = autotune.coarse_candidates(shape, 132)
        assert 8 <= len(coarse) <= autotune.COARSE
        assert coarse[0] == autotune.coarse_candidates(shape, 132)[0]  # deterministic
        assert all(autotune.allowed(shape, c) for c in coarse)
    assert all(c[2] == 1 and gu.n % c[0] == 0 for c in autotune.coarse_candidates(gu, 132))
    assert autotune.coarse_candidates(LM, 132)[0] == gemm_configs.heuristic_config(LM.n, LM.k, 132)


def test_best_config_chosen():
    target = autotune.coarse_candidates(LM, 132)[5]
    better = (*target[:3], 8 if target[0] >= 64 else 4, 5)  # a refinement of the best two
    timer = fake_timer({target: 20.0, better: 15.0})
    cfg, done = autotune.tune_shape(LM, 132, timer, float("inf"))
    assert done and cfg == better
    assert {m for _, m in timer.calls} == set(autotune.MS)
    assert len({c for c, _ in timer.calls}) <= autotune.COARSE + 12


@pytest.mark.parametrize("cublas,wins", [(98.0, False), (96.0, True)])
def test_cublas_taken_only_when_over_3_percent_faster(cublas, wins):
    best = autotune.coarse_candidates(LM, 132)[0]
    cfg, done = autotune.tune_shape(LM, 132, fake_timer({best: 50.0}, cublas=cublas / 2), float("inf"))
    assert done and (cfg is None) == wins


def test_layer_gemm_never_cublas():
    for role in ("o", "router"):
        shape = autotune.GemmShape(4096, 4096, {role}, 36)
        cfg, done = autotune.tune_shape(shape, 132, fake_timer(cublas=1.0), float("inf"))
        assert done and cfg is not None


def test_failing_configs_fall_back_to_cublas():
    cfg, done = autotune.tune_shape(LM, 132, lambda cfg, m: None if cfg else 1.0, float("inf"))
    assert done and cfg is None


# ----------------------------------------------------------------------------- end to end (fake GPU)
def _shapes(n):
    return [autotune.GemmShape(4096 + 512 * i, 4096, {"o"}, 1) for i in range(n)]


def test_tune_shapes_caches_and_config_for_sees_it(fake_gpu, monkeypatch, capsys):
    shape = _shapes(1)[0]
    before = gemm_configs.config_for(shape.n, shape.k)  # the heuristic, now cached by lru_cache
    assert before == gemm_configs.heuristic_config(shape.n, shape.k, 142)
    chosen = (32, 128, 4, 4, 4)
    monkeypatch.setattr(autotune, "make_timer", lambda *a: fake_timer({chosen: 10.0}))
    assert autotune.tune_shapes([shape], "cuda") == {shape.key: chosen}
    assert gemm_configs.config_for(shape.n, shape.k) == chosen
    assert gemm_configs.cache_path(GPU).exists()
    err = capsys.readouterr().err
    assert f"tuning 1 GEMM shape for {GPU} (first use, cached in" in err
    assert "tuned 1/1 shapes" in err


def test_budget_cut_off(fake_gpu, monkeypatch, capsys):
    clock = [0.0]
    monkeypatch.setattr(autotune.time, "monotonic", lambda: clock[0])

    def slow_timer(cfg, m):  # one second per timing
        clock[0] += 1.0
        return 10.0
    monkeypatch.setattr(autotune, "make_timer", lambda *a: slow_timer)
    per_shape = 2 * len(autotune.coarse_candidates(_shapes(1)[0], 142))
    tuned = autotune.tune_shapes(_shapes(3), "cuda", budget_s=per_shape * 1.5 + 30)
    assert len(tuned) == 1  # the second shape ran out of time: not cached, heuristic kept
    assert "budget of" in capsys.readouterr().err
    assert set(gemm_configs.cached_table(GPU)) == set(tuned)
    assert autotune.tune_shapes(_shapes(3), "cuda") == {}  # not retried in this process


def test_ensure_tuned_once_then_no_io(fake_gpu, monkeypatch):
    target, draft = tiny_pair()
    timers = []
    monkeypatch.setattr(autotune, "make_timer", lambda *a: timers.append(a) or fake_timer())
    autotune.ensure_tuned([target, draft], torch.device("cuda"))
    n_shapes = len(autotune.decode_shapes([target, draft]))
    assert len(timers) == n_shapes
    reads = []
    monkeypatch.setattr(gemm_configs, "_read", lambda path: reads.append(path) or {})
    autotune.ensure_tuned([target, draft], torch.device("cuda"))
    assert len(timers) == n_shapes and not reads


def test_off_switches(fake_gpu, monkeypatch):
    model = torch.nn.Linear(2, 2)
    monkeypatch.setattr(autotune, "decode_shapes", lambda models: pytest.fail("should not run"))
    autotune.ensure_tuned([model], torch.device("cpu"))
    monkeypatch.setenv("DFLASH_AUTOTUNE", "0")
    autotune.ensure_tuned([model], torch.device("cuda"))
    monkeypatch.delenv("DFLASH_AUTOTUNE")
    monkeypatch.setattr(kernels, "ENABLED", False)
    autotune.ensure_tuned([model], torch.device("cuda"))
    monkeypatch.setattr(kernels, "ENABLED", True)
    monkeypatch.setattr(kernels, "triton", None)
    autotune.ensure_tuned([model], torch.device("cuda"))


def test_shipped_table_counts_only_for_its_own_gpu(fake_gpu, monkeypatch):
    h200_shape = autotune.GemmShape(2560, 4096, {"o"}, 1)  # in the H100 and H200 tables
    assert gemm_configs.shipped_table("NVIDIA H200")[h200_shape.key]
    assert gemm_configs.shipped_table(GPU) == {}  # the H100 fallback does not count
    monkeypatch.setattr(autotune, "make_timer", lambda *a: pytest.fail("H200 is tuned"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA H200")
    assert autotune.tune_shapes([h200_shape], "cuda") == {}


# ----------------------------------------------------------------------------- CUDA
@pytest.mark.skipif(not torch.cuda.is_available() or kernels.triton is None, reason="needs CUDA + Triton")
def test_gpu_tuning_writes_cache_and_config_for_returns_it(fresh, monkeypatch):
    monkeypatch.undo()  # the real driver version
    monkeypatch.setenv("DFLASH_CACHE_DIR", str(fresh / "cache"))
    monkeypatch.setattr(gemm_configs, "_tables", {})
    monkeypatch.setattr(autotune, "_attempted", set())
    shape = autotune.GemmShape(3072, 1536, {"o"}, 1)  # in no shipped table
    tuned = autotune.tune_shapes([shape], "cuda", budget_s=60)
    cfg = tuned[shape.key]
    assert cfg is not None and gemm_configs.cache_path(torch.cuda.get_device_name()).exists()
    assert gemm_configs.config_for(shape.n, shape.k) == cfg
    x = torch.randn(16, shape.k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(shape.n, shape.k, device="cuda", dtype=torch.bfloat16) * 0.02
    torch.testing.assert_close(kernels.skinny_matmul(x, w), torch.nn.functional.linear(x, w),
                               atol=2e-2, rtol=2e-2)
