"""dflash.bench.analyze against a hand-computed example (three sweeps: math, code, chat)."""
from __future__ import annotations

import json
import math

import pytest

from dflash.bench import analyze as A
from dflash.errors import UserError

# block size -> (speedup, tau) of three sweeps; tau/b is given next to each point.
SWEEPS = {
    "sweep_reason": ("aime25", {4: (1.0, 2), 8: (2.0, 4), 16: (1.5, 6)}),      # .5, .5, .375
    "sweep_code": ("humaneval", {4: (1.5, 3), 8: (2.5, 6), 16: (3.5, 9)}),     # .75, .75, .5625
    "sweep_chat": ("mt-bench", {4: (1.2, 2), 8: (1.1, 2), 16: (0.9, 2)}),      # .5, .25, .125
}


def write_sweeps(root):
    for name, (dataset, points) in SWEEPS.items():
        folder = root / name
        folder.mkdir()
        lines = ["dataset,max_samples,block_size,speedup,tau,status,error"]
        lines += [f"{dataset},8,{b},{s},{t},ok," for b, (s, t) in points.items()]
        if name == "sweep_reason":  # rows the analysis must skip
            lines += [f"{dataset},8,12,,,failed,boom", f"{dataset},8,1,1.0,1.0,ok,"]
        (folder / "summary.csv").write_text("\n".join(lines) + "\n")
    return sorted(str(p) for p in root.glob("sweep_*"))


def test_statistics_by_hand():
    # x = 1 2 3 4, y = 1 3 2 4: dx = dy-permuted (-1.5 -.5 .5 1.5), sum dx*dy = 4, sum dx^2 = 5
    assert A.pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert A.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    # ties: ranks of x = 1 2.5 2.5 4 -> rho = 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10)
    assert list(A.rankdata([1, 2, 2, 3])) == [1, 2.5, 2.5, 4]
    assert A.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(3 / math.sqrt(10))
    assert A.pearson([1, 2], [2, 1]) is None            # fewer than 3 points
    assert A.pearson([2, 2, 2], [1, 2, 3]) is None      # constant
    # p-value of r = 0.8, n = 4: t = 0.8 * sqrt(2 / 0.36) = 1.8856, two-sided, 2 dof:
    # p = 1 - t / sqrt(2 + t^2) (closed form for 2 dof)
    t = 0.8 * math.sqrt(2 / 0.36)
    assert A.p_value(0.8, 4) == pytest.approx(1 - t / math.sqrt(2 + t * t))
    scipy_stats = pytest.importorskip("scipy.stats")
    x, y = [3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8]
    r, p = scipy_stats.pearsonr(x, y)
    assert A.pearson(x, y) == pytest.approx(r) and A.p_value(A.pearson(x, y), 8) == pytest.approx(p)
    rho, p = scipy_stats.spearmanr(x, y)
    assert A.spearman(x, y) == pytest.approx(rho)
    assert A.correlate(x, y)["spearman_p"] == pytest.approx(p)


def test_hand_computed_example(tmp_path, capsys):
    inputs = write_sweeps(tmp_path)
    out = tmp_path / "out"
    assert A.main([*inputs, "--out-dir", str(out)]) == 0
    res = json.loads((out / "analysis.json").read_text())
    assert res["points"] == 9 and res["skipped_rows"] == 2 and res["block_sizes"] == [4, 8, 16]
    corr = res["correlations"]
    # overall tau vs speedup, 9 points: sum x = 36, sum y = 15.2, sum xy = 76.4,
    # sum x^2 = 194, sum y^2 = 31.46 -> Sxy = 76.4 - 36*15.2/9 = 15.6, Sxx = 194 - 144 = 50,
    # Syy = 31.46 - 15.2^2/9 = 5.78889; r = 15.6 / sqrt(50 * 5.78889)
    assert corr["overall"]["tau_vs_speedup"]["pearson"] == pytest.approx(
        15.6 / math.sqrt(50 * (31.46 - 15.2 ** 2 / 9)))
    assert corr["overall"]["tau_vs_speedup"]["n"] == 9
    # math: tau 2 4 6, speedup 1 2 1.5: dx = -2 0 2, dy = -.5 .5 0 -> r = 1 / sqrt(8 * .5) = .5;
    # ranks 1 2 3 vs 1 3 2 -> rho = 1 / 2 = .5; tau/b = .5 .5 .375 vs dy -> 0
    m = corr["math"]
    assert m["tau_vs_speedup"]["pearson"] == pytest.approx(0.5)
    assert m["tau_vs_speedup"]["spearman"] == pytest.approx(0.5)
    assert m["tau_per_block_vs_speedup"]["pearson"] == pytest.approx(0.0, abs=1e-12)
    assert m["tau_per_block_vs_speedup"]["spearman"] == pytest.approx(0.0, abs=1e-12)
    # code: tau 3 6 9 vs 1.5 2.5 3.5 exactly linear -> 1; tau/b = .75 .75 .5625 is proportional
    # to (.5 .5 -1) around its mean, speedup to (-1 0 1): r = -1.5 / sqrt(1.5 * 2) = -sqrt(3)/2
    c = corr["code"]
    assert c["tau_vs_speedup"]["pearson"] == pytest.approx(1.0)
    assert c["tau_vs_speedup"]["spearman"] == pytest.approx(1.0)
    assert c["tau_per_block_vs_speedup"]["pearson"] == pytest.approx(-math.sqrt(3) / 2)
    assert c["tau_per_block_vs_speedup"]["spearman"] == pytest.approx(-math.sqrt(3) / 2)
    # chat: tau is constant -> undefined
    assert corr["chat"]["tau_vs_speedup"]["pearson"] is None
    # policy. step 4->8: wins math (.5), code (.75), loses chat (.25) -> threshold .5
    #         step 8->16: wins code (.5625), loses math (.375), chat (.125) -> threshold .5625
    overall = {s["step"]: s for s in res["policy"]["overall"]}
    assert overall["4->8"]["threshold"] == pytest.approx(0.5)
    assert overall["4->8"]["max_losing_ratio"] == pytest.approx(0.25)
    assert (overall["4->8"]["wins"], overall["4->8"]["observations"]) == (2, 3)
    assert overall["8->16"]["threshold"] == pytest.approx(0.5625)
    assert overall["8->16"]["max_losing_ratio"] == pytest.approx(0.375)
    assert overall["8->16"]["separable"] and overall["8->16"]["accuracy"] == 1.0
    math_steps = {s["step"]: s for s in res["policy"]["math"]}
    assert math_steps["4->8"]["threshold"] == pytest.approx(0.5)
    assert math_steps["8->16"]["threshold"] is None     # 16 never beat 8 on math: cap at 8
    assert [s["threshold"] for s in res["policy"]["chat"]] == [None, None]
    best = {b["dataset"]: b["best_block_size"] for b in res["best_per_sweep"]}
    assert best == {"aime25": 8, "humaneval": 16, "mt-bench": 4}
    md = (out / "analysis.md").read_text()
    assert "| 8->16 | 0.562 | 1 / 3 | 0.375 | yes | 1.00 |" in md
    assert "tau/16 stays >= **0.562**" in md
    assert md in capsys.readouterr().out
    assert (out / "analysis_scatter.png").read_bytes()[:4] == b"\x89PNG"


def test_overlapping_wins_and_losses():
    obs = [{"small": 4, "large": 8, "ratio": r, "wins": w}
           for r, w in [(0.3, True), (0.4, False), (0.6, True), (0.2, False)]]
    (step,) = A.thresholds(obs)
    assert step["threshold"] == 0.3 and step["max_losing_ratio"] == 0.4
    assert not step["separable"] and step["accuracy"] == pytest.approx(0.75)


def test_errors(tmp_path):
    with pytest.raises(UserError, match="no such sweep folder"):
        A.main([str(tmp_path / "nothing_*")])
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match="lacks column"):
        A.main([str(tmp_path / "bad.csv")])
    (tmp_path / "failed.csv").write_text("dataset,block_size,speedup,tau,status\naime25,4,,,failed\n")
    with pytest.raises(UserError, match="no usable rows"):
        A.main([str(tmp_path / "failed.csv"), "--out-dir", str(tmp_path / "o")])
