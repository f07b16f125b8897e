"""weightlab's merge against mergekit on the same mergekit YAML, side by side in one run.

    .venv/bin/python benchmarks/merge_vs_mergekit.py            # build inputs (cached), run, update RESULTS.md
    .venv/bin/python benchmarks/merge_vs_mergekit.py --repeats 1 --no-write
    .venv/bin/python benchmarks/merge_vs_mergekit.py --profile   # also cProfile weightlab's child, print the top

Inputs (built once, reused): a ~180M-parameter Llama-style model in bf16 (random init, seed 0)
saved with transformers, and three "fine-tunes" of it: each 2-D weight plus a random rank-8
update of relative RMS 1e-2 (a different seed per fine-tune), each 1-D weight (norms) plus
dense noise of relative RMS 1e-2. They live in $WEIGHTLAB_CACHE/bench/ (default
~/.cache/weightlab/bench/), or --cache-dir.

Merges, each from ONE mergekit YAML file given to both tools:
  linear            the three fine-tunes, weights 0.5/0.3/0.2, dtype bfloat16
  ties              base + the three fine-tunes, weight 1.0, density 0.5, normalize: true, dtype bfloat16
  slerp             ft1 -> ft2 over slices of all layers, t a gradient per self_attn / mlp (mergekit's example)
  model_stock       base + the three fine-tunes
  breadcrumbs_ties  base + the three fine-tunes, weight 1.0, density 0.5, gamma 0.01

Each tool runs in its own child process (`mergekit-yaml`; for weightlab a child of this script
that calls load_merge_config + run_merge), so wall time includes each tool's start-up and
the peak RSS is the child's own. The order alternates (between repeats and between merges).
The outputs are then compared tensor by tensor (largest |difference|, largest difference in
bf16 ulps, share of entries that differ), and the TIES differences are sorted by cause (see
TiesExplainer). The "## Merge: weightlab vs mergekit" section of benchmarks/RESULTS.md is
replaced (other sections are kept).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

SECTION = "Merge: weightlab vs mergekit"
REPRO = ".venv/bin/python benchmarks/merge_vs_mergekit.py"

# ~181M parameters: untied embeddings 2 x 32000 x 768 + 16 x (4 x 768^2 + 3 x 768 x 2560) + norms
MODEL = dict(hidden_size=768, intermediate_size=2560, num_hidden_layers=16, num_attention_heads=12,
             num_key_value_heads=12, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)
FINETUNE_SEEDS = (1, 2, 3)
RANK = 8
REL_SCALE = 1e-2
LINEAR_WEIGHTS = (0.5, 0.3, 0.2)
TIES_DENSITY = 0.5
# weightlab wall time / mergekit wall time, at most
TARGETS = {"linear": 1.0, "ties": 0.3, "slerp": 1.0, "model_stock": 1.0, "breadcrumbs_ties": 1.0}
SHARD_SIZE = "5GB"  # weightlab's default max_shard_size; mergekit's default (5B params) also gives one shard here


# ----------------------------------------------------------------------------- inputs

def cache_root(arg: str | None) -> Path:
    if arg:
        return Path(arg).expanduser()
    env = os.environ.get("WEIGHTLAB_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "weightlab") / "bench"


def _spec_tag() -> str:
    import hashlib

    spec = json.dumps({"model": MODEL, "seeds": FINETUNE_SEEDS, "rank": RANK, "scale": REL_SCALE, "v": 1},
                      sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()[:10]


def build_inputs(root: Path) -> dict[str, Path]:
    """base + ft1..ft3 as HF folders; each is built in a temporary folder and renamed when complete."""
    import shutil
    import tempfile

    d = root / f"llama180m-{_spec_tag()}"
    paths = {"base": d / "base", **{f"ft{s}": d / f"ft{s}" for s in FINETUNE_SEEDS}}
    if all((p / "config.json").is_file() for p in paths.values()):
        return paths
    d.mkdir(parents=True, exist_ok=True)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    def finish(model, target: Path):
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=d))
        model.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.rename(tmp, target)

    if not (paths["base"] / "config.json").is_file():
        C.log("building the base model (~180M params, bf16) ...")
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**MODEL)).to(torch.bfloat16)
        n = sum(p.numel() for p in model.parameters())
        C.log(f"  {n / 1e6:.1f}M parameters")
        finish(model, paths["base"])
        del model
    for s in FINETUNE_SEEDS:
        target = paths[f"ft{s}"]
        if (target / "config.json").is_file():
            continue
        C.log(f"building fine-tune ft{s} (base + rank-{RANK} updates, seed {s}) ...")
        model = LlamaForCausalLM.from_pretrained(paths["base"], dtype=torch.bfloat16)
        g = torch.Generator().manual_seed(1000 + s)
        with torch.no_grad():
            for _, p in sorted(model.named_parameters()):
                w = p.float()
                rms = float(w.pow(2).mean().sqrt()) or 1.0
                if p.dim() == 2:
                    u = torch.randn(p.shape[0], RANK, generator=g)
                    v = torch.randn(RANK, p.shape[1], generator=g)
                    upd = (u @ v) * (REL_SCALE * rms / RANK ** 0.5)  # entries of u@v have variance RANK
                else:
                    upd = torch.randn(p.shape, generator=g) * (REL_SCALE * rms)
                p.copy_((w + upd).to(p.dtype))
                del w, upd
        finish(model, target)
        del model
    return paths


# ----------------------------------------------------------------------------- configs and runs

def write_configs(work: Path, paths: dict[str, Path]) -> dict[str, Path]:
    fts = [paths[f"ft{s}"] for s in FINETUNE_SEEDS]
    linear = ["merge_method: linear", "models:"]
    for p, w in zip(fts, LINEAR_WEIGHTS):
        linear += [f"  - model: {p}", f"    parameters: {{weight: {w}}}"]
    linear += ["dtype: bfloat16"]
    ties = ["merge_method: ties", f"base_model: {paths['base']}", "models:"]
    for p in fts:
        ties += [f"  - model: {p}", f"    parameters: {{weight: 1.0, density: {TIES_DENSITY}}}"]
    ties += ["parameters: {normalize: true}", "dtype: bfloat16"]
    n = MODEL["num_hidden_layers"]
    slerp = ["merge_method: slerp", f"base_model: {fts[0]}", "slices:", "  - sources:",
             f"      - model: {fts[0]}", f"        layer_range: [0, {n}]",
             f"      - model: {fts[1]}", f"        layer_range: [0, {n}]",
             "parameters:", "  t:", "    - filter: self_attn", "      value: [0, 0.5, 0.3, 0.7, 1]",
             "    - filter: mlp", "      value: [1, 0.5, 0.7, 0.3, 0]", "    - value: 0.5", "dtype: bfloat16"]
    stock = ["merge_method: model_stock", f"base_model: {paths['base']}", "models:"]
    stock += [f"  - model: {p}" for p in fts] + ["dtype: bfloat16"]
    crumbs = ["merge_method: breadcrumbs_ties", f"base_model: {paths['base']}", "models:"]
    for p in fts:
        crumbs += [f"  - model: {p}", f"    parameters: {{weight: 1.0, density: {TIES_DENSITY}, gamma: 0.01}}"]
    crumbs += ["dtype: bfloat16"]
    out = {}
    for name, lines in (("linear", linear), ("ties", ties), ("slerp", slerp), ("model_stock", stock),
                        ("breadcrumbs_ties", crumbs)):
        f = work / f"{name}.yml"
        f.write_text("\n".join(lines) + "\n", encoding="utf-8")
        out[name] = f
    return out


def mergekit_exe() -> Path:
    """mergekit-yaml: $WEIGHTLAB_MERGEKIT_YAML, the .venv-mk venv `make test` builds, or beside this Python."""
    for cand in (os.environ.get("WEIGHTLAB_MERGEKIT_YAML"), C.REPO_ROOT / ".venv-mk" / "bin" / "mergekit-yaml",
                 Path(sys.executable).parent / "mergekit-yaml"):
        if cand and Path(cand).is_file():
            return Path(cand)
    sys.exit("mergekit-yaml not found: `make test` builds it in .venv-mk (or set WEIGHTLAB_MERGEKIT_YAML)")


def mergekit_version() -> str:
    import subprocess

    py = mergekit_exe().parent / "python"
    r = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
                       capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def mergekit_cmd(cfg: Path, out: Path) -> list[str]:
    exe = mergekit_exe()
    # CPU defaults; --random-seed for reproducibility; --quiet drops progress bars (weightlab runs without them)
    return [str(exe), str(cfg), str(out), "--random-seed", "0", "--out-shard-size", "5B", "--quiet"]


def weightlab_cmd(cfg: Path, out: Path, profile: Path | None = None) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "_weightlab-child", str(cfg), str(out)]
    return cmd + (["--profile", str(profile)] if profile else [])


def weightlab_child(argv: list[str]) -> int:
    """What the weightlab child process runs: load the mergekit YAML and merge, nothing else."""
    ap = argparse.ArgumentParser(prog="merge_vs_mergekit.py _weightlab-child")
    ap.add_argument("config")
    ap.add_argument("out")
    ap.add_argument("--profile")
    a = ap.parse_args(argv)

    def go():
        from weightlab.merge import run_merge
        from weightlab.merge.api import load_merge_config

        job = load_merge_config(a.config)
        job = job.model_copy(update={"max_shard_size": SHARD_SIZE})
        return run_merge(job, a.out, force=True, show_progress=False)

    if a.profile:
        import cProfile

        prof = cProfile.Profile()
        res = prof.runcall(go)
        prof.dump_stats(a.profile)
    else:
        res = go()
    print(json.dumps({"weightlab_report": res.report}))
    return 0


# ----------------------------------------------------------------------------- comparison

def _ulps(x, y, scale=None):
    """|x - y| in ulps of the larger magnitude of the two (and of ``scale``), for bf16/fp16 (0 where equal).

    (Counting representable values between x and y instead would make a sign flip near 0
    look like tens of thousands of ulps.)
    """
    import torch

    mant = {torch.bfloat16: 7, torch.float16: 10}[x.dtype]  # explicit mantissa bits
    tiny_exp = {torch.bfloat16: -125, torch.float16: -13}[x.dtype]  # frexp exponent of the smallest normal
    xf, yf = x.float(), y.float()
    big = torch.maximum(xf.abs(), yf.abs())
    if scale is not None:
        big = torch.maximum(big, scale.float().abs())
    _, e = torch.frexp(big)  # big = m * 2**e with m in [0.5, 1)
    ulp = torch.ldexp(torch.ones_like(big), (e.clamp(min=tiny_exp) - 1 - mant).to(torch.int32))
    return (xf - yf).abs() / ulp


class _Files:
    """safe_open handles of a folder of safetensors files, opened once."""

    def __init__(self, d: Path):
        from safetensors import safe_open

        self.where, self._h = {}, []
        for f in sorted(Path(d).glob("*.safetensors")):
            h = safe_open(str(f), "pt")
            self._h.append(h)
            for k in h.keys():
                self.where[k] = h

    def get(self, name: str):
        return self.where[name].get_tensor(name)


class TiesExplainer:
    """Sorts the entries where the two TIES outputs differ by cause.

    trim tie    some model's |delta| equals its trim threshold (the k-th largest |delta| of that
                tensor): which of the equal-magnitude entries make the top k is arbitrary (mergekit:
                argsort of bf16-rounded deltas, weightlab: lowest index first on exact deltas), and bf16 deltas tie a lot
    bf16 delta  otherwise: mergekit's bf16 delta (t - base rounded to bf16) is not the exact delta for
                some model (happens where |base| << |t|), which can move it across the trim threshold
                or change the elected sign
    rounding    otherwise: |diff| <= 2 bf16 ulps of max(|output|, |base|): mergekit rounds to bf16 after
                every step (the merged delta, then base + delta), weightlab computes in float32 and
                rounds once; where base + delta cancels, one ulp of the intermediate is several of the output
    other       the rest (printed with examples: these deserve a look)
    """

    CATS = ("trim tie", "bf16 delta", "rounding", "other")

    def __init__(self, paths: dict[str, Path], density: float):
        self.base = _Files(paths["base"])
        self.fts = [_Files(paths[f"ft{s}"]) for s in FINETUNE_SEEDS]
        self.density = density
        self.counts = dict.fromkeys(self.CATS, 0)
        self.examples: list[str] = []

    def __call__(self, name, wl, mk, differ, ulps):
        import torch

        b16 = self.base.get(name)
        b = b16.float()
        tie = torch.zeros(b.shape, dtype=torch.bool)
        inexact = torch.zeros(b.shape, dtype=torch.bool)
        n = b.numel()
        k = max(1, int(self.density * n))
        for f in self.fts:
            t16 = f.get(name)
            d = t16.float() - b
            a = d.abs()
            if k < n:  # density 1 keeps everything: no threshold
                tie |= a == torch.kthvalue(a.reshape(-1), n - k + 1).values
            inexact |= (t16 - b16).float() != d
        rest = differ.clone()
        for cat, m in (("trim tie", tie), ("bf16 delta", inexact), ("rounding", _ulps(wl, mk, b) <= 2)):
            hit = rest & m
            self.counts[cat] += int(hit.sum())
            rest &= ~hit
        n_other = int(rest.sum())
        self.counts["other"] += n_other
        if n_other and len(self.examples) < 5:
            i = int(rest.reshape(-1).nonzero()[0])
            vals = [float(f.get(name).reshape(-1)[i]) for f in self.fts]
            self.examples.append(f"{name}[{i}]: base {float(b.reshape(-1)[i]):.6g}, fine-tunes {vals}, "
                                 f"weightlab {float(wl.reshape(-1)[i]):.6g}, mergekit {float(mk.reshape(-1)[i]):.6g}")


def compare_outputs(wl_dir: Path, mk_dir: Path, explain=None) -> dict:
    """Tensor-by-tensor comparison of two output folders (weightlab's, mergekit's)."""
    import torch

    fa, fb = _Files(wl_dir), _Files(mk_dir)
    ia, ib = fa.where, fb.where
    only_a, only_b = sorted(set(ia) - set(ib)), sorted(set(ib) - set(ia))
    total = differing = over1 = 0
    max_abs, max_ulp, worst, worst_ulp_name = 0.0, 0.0, "", ""
    dtypes = set()
    per_tensor = []
    for name in sorted(set(ia) & set(ib)):
        x, y = fa.get(name), fb.get(name)
        dtypes.add(f"{x.dtype}/{y.dtype}")
        if x.shape != y.shape:
            per_tensor.append((name, float("inf"), float("inf"), 1.0))
            max_abs, worst = float("inf"), name
            continue
        n = x.numel()
        if n == 0:
            continue
        xf, yf = x.float(), y.float()
        differ = xf != yf
        nd = int(differ.sum())
        m = float((xf - yf).abs().max())
        u = 0.0
        if x.dtype == y.dtype and x.dtype in (torch.bfloat16, torch.float16):
            ud = _ulps(x, y)
            u = float(ud.max())
            over1 += int((ud > 1).sum())
            if explain is not None and nd:
                explain(name, x, y, differ, ud)
        total += n
        differing += nd
        per_tensor.append((name, m, u, nd / n))
        if m > max_abs:
            max_abs, worst = m, name
        if u > max_ulp:
            max_ulp, worst_ulp_name = u, name
    per_tensor.sort(key=lambda r: (-r[1], -r[2]))
    return {"tensors": len(set(ia) & set(ib)), "only_weightlab": only_a, "only_mergekit": only_b,
            "entries": total, "differing": differing, "share_differing": differing / max(total, 1),
            "share_over_1ulp": over1 / max(total, 1), "max_abs_diff": max_abs, "max_abs_tensor": worst,
            "max_ulp": max_ulp, "max_ulp_tensor": worst_ulp_name, "dtypes": sorted(dtypes),
            "worst_tensors": per_tensor[:5]}


# ----------------------------------------------------------------------------- driver

def run_pair(name: str, cfg: Path, work: Path, repeats: int, offset: int = 0, explain=None) -> dict:
    stats = {"mergekit": C.Stats(), "weightlab": C.Stats()}
    outs = {"mergekit": work / f"out-{name}-mergekit", "weightlab": work / f"out-{name}-weightlab"}
    for rep in range(repeats):
        order = ("mergekit", "weightlab") if (rep + offset) % 2 == 0 else ("weightlab", "mergekit")
        for tool in order:
            C.rmtree(outs[tool])
            cmd = mergekit_cmd(cfg, outs[tool]) if tool == "mergekit" else weightlab_cmd(cfg, outs[tool])
            r = C.run_measured(cmd, cwd=str(C.REPO_ROOT)).check(f"{tool} {name}")
            stats[tool].runs.append(r)
            extra = ""
            if tool == "weightlab":
                for line in r.stdout.splitlines():
                    if line.startswith("{\"weightlab_report\""):
                        extra = f" (merge loop {json.loads(line)['weightlab_report'].get('seconds')} s)"
            C.log(f"  {name:6s} {tool:9s} run {rep + 1}: {r.wall_s:6.1f} s, peak RSS {r.peak_rss_mib:7.0f} MiB{extra}")
    C.log(f"  comparing {name} outputs ...")
    cmp = compare_outputs(outs["weightlab"], outs["mergekit"], explain)
    if explain is not None:
        cmp["causes"], cmp["cause_examples"] = explain.counts, explain.examples
    return {"stats": stats, "cmp": cmp, "rss_source": stats["weightlab"].runs[0].rss_source}


def profile_weightlab(name: str, cfg: Path, work: Path, top: int = 25) -> str:
    import io
    import pstats

    prof = work / f"weightlab-{name}.prof"
    out = work / f"out-{name}-weightlab-prof"
    C.rmtree(out)
    r = C.run_measured(weightlab_cmd(cfg, out, prof), cwd=str(C.REPO_ROOT)).check(f"weightlab {name} (profiled)")
    C.rmtree(out)
    buf = io.StringIO()
    st = pstats.Stats(str(prof), stream=buf)
    st.sort_stats("cumulative").print_stats(top)
    st.sort_stats("tottime").print_stats(top)
    return f"profiled weightlab {name}: {r.wall_s:.1f} s wall under cProfile; stats in {prof}\n{buf.getvalue()}"


def model_size(paths: dict[str, Path]) -> tuple[int, str]:
    from safetensors import safe_open

    n, dts = 0, set()
    for f in sorted(paths["base"].glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                sl = fh.get_slice(k)
                shape = sl.get_shape()
                c = 1
                for s in shape:
                    c *= s
                n += c
                dts.add(str(sl.get_dtype()))
    return n, "/".join(sorted(dts))


def render(results: dict, nparams: int, dtype: str, repeats: int, total_s: float) -> str:
    rows = []
    verdicts = []
    notes = []
    for name, res in results.items():
        mk, wl = res["stats"]["mergekit"], res["stats"]["weightlab"]
        tr, rr = wl.wall_s / mk.wall_s, wl.peak_rss_mib / mk.peak_rss_mib
        c = res["cmp"]
        rows.append([name, f"{mk.wall_s:.1f}", f"{wl.wall_s:.1f}", f"**{tr:.2f}x**", f"{mk.peak_rss_mib:.0f}",
                     f"{wl.peak_rss_mib:.0f}", f"**{rr:.2f}x**", f"{c['max_abs_diff']:.3g}", f"{c['max_ulp']:.0f}",
                     f"{100 * c['share_differing']:.3f}%", f"{100 * c['share_over_1ulp']:.4f}%"])
        t = TARGETS[name]
        pairs = list(zip(wl.runs, mk.runs))  # the i-th run of each tool ran back to back (order alternating)
        times = [a.wall_s / b.wall_s for a, b in pairs]
        rss = [a.peak_rss_mib / b.peak_rss_mib for a, b in pairs]
        verdicts.append(f"- {name}: time per pair {', '.join(f'{x:.2f}x' for x in times)} vs target <= {t}x: "
                        f"**{C.ratio_verdict(times, t)}**; peak RSS per pair {', '.join(f'{x:.2f}x' for x in rss)} "
                        f"vs target <= 1x: **{C.ratio_verdict(rss, 1.0)}**")
        if c["only_weightlab"] or c["only_mergekit"]:
            verdicts.append(f"  - tensor names differ: only weightlab {c['only_weightlab'][:5]}, "
                            f"only mergekit {c['only_mergekit'][:5]}")
        runs = "; ".join(f"{t} " + " / ".join(f"{r.wall_s:.1f}" for r in res["stats"][t].runs) + " s"
                         for t in ("mergekit", "weightlab"))
        notes.append(f"- {name}: single runs {runs}.")
        if c["differing"] == 0:
            notes.append(f"- {name}: the outputs are bit-identical.")
        elif c.get("causes"):
            parts = ", ".join(f"{cat} {100 * v / c['differing']:.1f}%" for cat, v in c["causes"].items())
            notes.append(f"- {name}: {c['differing']:,} of {c['entries']:,} entries differ; by cause: {parts}. "
                         f"Largest |diff| in {c['max_abs_tensor']}.")
        else:
            notes.append(f"- {name}: {c['differing']:,} of {c['entries']:,} entries differ. "
                         f"Largest |diff| in {c['max_abs_tensor']}.")
    table = C.md_table(["merge", "mergekit s", "weightlab s", "time ratio", "mergekit MiB", "weightlab MiB",
                        "RSS ratio", "max abs diff", "max ulps", "entries differing", "differing > 1 ulp"], rows)
    rss_src = next(iter(results.values()))["rss_source"] if results else ""
    return f"""\
Date: {C.today()}. Machine: {C.machine_line()} (shared, noisy).
Versions: torch {C.package_version('torch')}, mergekit {mergekit_version()} (its own venv), \
weightlab {C.package_version('weightlab')}, transformers {C.package_version('transformers')}.

Inputs: a Llama-style model of {nparams / 1e6:.1f}M parameters ({dtype}; hidden {MODEL['hidden_size']}, \
intermediate {MODEL['intermediate_size']}, {MODEL['num_hidden_layers']} layers, vocab {MODEL['vocab_size']}, \
untied embeddings; random init) and three fine-tunes (every 2-D weight + a random rank-{RANK} update of \
relative RMS {REL_SCALE:g}, norms + dense noise of relative RMS {REL_SCALE:g}; seeds {', '.join(map(str, FINETUNE_SEEDS))}).
Merges, one mergekit YAML per merge given to both tools: **linear** over the three fine-tunes (weights \
{'/'.join(map(str, LINEAR_WEIGHTS))}, `dtype: bfloat16`); **ties** over base + the three fine-tunes (weight 1.0, \
density {TIES_DENSITY}, `normalize: true`, `dtype: bfloat16`); **slerp** from ft1 to ft2 over `slices` of all \
layers with mergekit's example gradients of `t` for self_attn and mlp (0.5 elsewhere); **model_stock** over \
base + the three fine-tunes; **breadcrumbs_ties** over base + the three fine-tunes (weight 1.0, density \
{TIES_DENSITY}, gamma 0.01). All `dtype: bfloat16`.
Each tool runs in its own process: `mergekit-yaml CONFIG OUT --random-seed 0 --out-shard-size 5B --quiet` \
(CPU defaults) and a Python child calling `load_merge_config` + `run_merge` (weightlab defaults). Wall time \
includes process start-up and imports; the table gives the median of {repeats} run(s) per tool (order \
alternating, inputs in the page cache), the verdicts the ratio of each pair of runs (met only when every pair \
meets the target, with at least 3 pairs). Peak RSS is the child's own (max over runs; from {rss_src}). Ratios are \
weightlab / mergekit. Diffs compare the two outputs tensor by tensor (bf16 ulps; "differing" = share of \
all entries whose values are not identical).

{table}

Targets (weightlab / mergekit): TIES time <= 0.3x, every other merge's time <= 1x, peak RSS <= 1x.
{chr(10).join(verdicts)}

Notes:
{chr(10).join(notes)}
- Causes of TIES differences (each differing entry counted once, first match): *trim tie* = some \
model's |delta| equals its trim threshold, so which equal-magnitude entries make the top k is arbitrary \
(mergekit: `argsort` of its bf16-rounded deltas, weightlab: the lowest indices first, on exact float32 deltas), and bf16 fine-tuning deltas take few distinct values, so \
such ties are common; *bf16 delta* = mergekit's delta `t - base` rounded to bf16 is not exact for some \
model (where |base| << |t|), which can flip the elected sign of a near-cancelling sum or cross the \
threshold (weightlab uses the exact delta); *rounding* = mergekit rounds to bf16 after each \
step, weightlab computes in float32 and rounds once (within 2 ulps of max(|output|, |base|), as cancellation \
in base + delta turns one ulp of the intermediate into several of the output); *other* = anything else. "max ulps" is \
|diff| in ulps of the larger of the two values.

Whole benchmark run: {total_s / 60:.1f} min. Reproduce: `{REPRO}` (inputs are cached under \
`$WEIGHTLAB_CACHE/bench/`, default `~/.cache/weightlab/bench/`; `--repeats N`, `--profile`, `--no-write`).
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_weightlab-child":
        return weightlab_child(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="runs per tool and merge (order alternates); default 3")
    ap.add_argument("--merges", default=",".join(TARGETS), help=f"comma-separated subset of: {','.join(TARGETS)}")
    ap.add_argument("--cache-dir", help="where inputs and outputs go (default $WEIGHTLAB_CACHE/bench)")
    ap.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    ap.add_argument("--profile", action="store_true", help="also run weightlab under cProfile and print the top")
    ap.add_argument("--keep-outputs", action="store_true", help="keep the merged folders")
    ap.add_argument("--no-explain", action="store_true", help="skip sorting the TIES differences by cause")
    a = ap.parse_args(argv)
    merges = [m.strip() for m in a.merges.split(",") if m.strip()]
    for m in merges:
        if m not in TARGETS:
            ap.error(f"unknown merge {m!r}")

    t0 = time.perf_counter()
    root = cache_root(a.cache_dir)
    paths = build_inputs(root)
    nparams, dtype = model_size(paths)
    work = root / "merge-work"
    work.mkdir(parents=True, exist_ok=True)
    cfgs = write_configs(work, paths)
    C.log(f"inputs: {nparams / 1e6:.1f}M params ({dtype}) in {paths['base'].parent}; warming the page cache ...")
    C.warm_page_cache(paths.values())

    results = {}
    for m in merges:
        C.log(f"merge {m}: {cfgs[m]}")
        explain = TiesExplainer(paths, TIES_DENSITY) if m == "ties" and not a.no_explain else None
        results[m] = run_pair(m, cfgs[m], work, a.repeats, offset=merges.index(m), explain=explain)
        c = results[m]["cmp"]
        C.log(f"  {m}: max |diff| {c['max_abs_diff']:.3g} ({c['max_abs_tensor']}), max {c['max_ulp']:.0f} ulp "
              f"({c['max_ulp_tensor']}), {100 * c['share_differing']:.3f}% of entries differ, "
              f"{100 * c['share_over_1ulp']:.4f}% by > 1 ulp")
        for row in c["worst_tensors"]:
            C.log(f"      {row[0]}: max |diff| {row[1]:.3g}, {row[2]:.0f} ulp, {100 * row[3]:.3f}% differ")
        if c.get("causes"):
            C.log(f"  {m}: differing entries by cause: {c['causes']}")
            for ex in c["cause_examples"]:
                C.log(f"      other: {ex}")
    if a.profile:
        for m in merges:
            print(profile_weightlab(m, cfgs[m], work))
    if not a.keep_outputs:
        for m in merges:
            for tool in ("mergekit", "weightlab"):
                C.rmtree(work / f"out-{m}-{tool}")
    total = time.perf_counter() - t0
    body = render(results, nparams, dtype, a.repeats, total)
    print("\n" + body)
    summary = {m: {"mergekit_s": r["stats"]["mergekit"].wall_s, "weightlab_s": r["stats"]["weightlab"].wall_s,
                   "mergekit_mib": r["stats"]["mergekit"].peak_rss_mib,
                   "weightlab_mib": r["stats"]["weightlab"].peak_rss_mib,
                   "runs": {t: [x.wall_s for x in s.runs] for t, s in r["stats"].items()},
                   "compare": r["cmp"]} for m, r in results.items()}
    (work / "last_results.json").write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")
    if not a.no_write and set(merges) == set(TARGETS):
        C.write_section(SECTION, body)
        C.log(f"updated {C.RESULTS_MD} ({SECTION!r})")
    elif not a.no_write:
        C.log("not all merges ran; RESULTS.md left as it is")
    return 0


if __name__ == "__main__":
    sys.exit(main())
