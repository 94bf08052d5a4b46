import json, glob, os, statistics as st
def fmt(r):
    return f"**{r:.3f}x**" if r >= 0.98 else f"{r:.3f}x"
rows = {}
for f in sorted(glob.glob("/tmp/dyn24/r*/*.json")):
    r = f.split("/")[-2]; name = os.path.basename(f)[:-5]
    ds, pol = name.rsplit("_", 1)
    d = json.load(open(f))
    rows.setdefault((ds, pol), []).append(d)
print("| set | policy | runs | fixed TPOT 8 / 12 / 16 / 8of16 / 12of16 (ms, mean) | best (mean) | dynamic TPOT (ms) | dyn tau | per run | pooled | switch rate | usage 8/12/16 % | greedy identical |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for (ds, pol), ds_runs in sorted(rows.items()):
    modes = list(ds_runs[0]["static"].keys())
    mean = {m: st.mean(x["static"][m]["tpot"] for x in ds_runs) * 1e3 for m in modes}
    best = min(mean, key=mean.get)
    dyn = st.mean(x["dynamic"]["tpot"] for x in ds_runs) * 1e3
    per = ", ".join(f"{x['dynamic_vs_best_fixed']:.3f}" for x in ds_runs)
    tau = st.mean(x["dynamic"]["tau"] for x in ds_runs)
    sw = st.mean(x["dynamic"]["switch_rate"] for x in ds_runs)
    use = {k: 100 * st.mean(x["dynamic"]["block_usage"].get(k, 0) for x in ds_runs) for k in ("8", "12", "16")}
    match = min(x["greedy_match_rate"] for x in ds_runs)
    fx = " / ".join(f"{mean[m]:.2f}" for m in ("8", "12", "16", "8/16", "12/16") if m in mean)
    print(f"| {ds.replace('builtin-','')} | {pol} | {len(ds_runs)} | {fx} | {best.replace('/','of')} | {dyn:.2f} | {tau:.2f} | {per} | {fmt(mean[best]/dyn)} | {100*sw:.0f}% | {use['8']:.0f} / {use['12']:.0f} / {use['16']:.0f} | {100*match:.0f}% |")
