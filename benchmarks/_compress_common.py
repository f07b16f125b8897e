"""Shared by the compression benchmarks (prune_smollm2.py, quantize.py): child processes in two venvs.

weightlab runs in the project's .venv, llm-compressor in its own .venv-lc (another transformers
release). Every (tool, method, setting) is one child process of the benchmark script itself
(`SCRIPT _child SPEC.json`), measured from outside with `_common.run_measured` (wall, peak RSS) and
from inside with the helpers below (phase times, CPU seconds, per-phase peak RSS).

The top level imports the standard library only: the children import this module in either venv,
and the llm-compressor venv has no weightlab installed (children put the repository's src/ on the path).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

LC_VENV = C.REPO_ROOT / ".venv-lc"
LC_SETUP = ("python3 -m venv .venv-lc && .venv-lc/bin/pip install torch==2.13.0 && "
            ".venv-lc/bin/pip install llmcompressor==0.14.0.1")
VERSIONS = ("torch", "transformers", "llmcompressor", "compressed-tensors", "datasets")

# SmolLM2 protocol of shared/design/baselines.md, shared by both benchmarks
NSAMPLES, SEQLEN = 32, 512
EVAL_TOKENS, EVAL_BATCH = 16384, 4
SMOKE = os.environ.get("WL_COMPRESS_BENCH_SMOKE") == "1" or os.environ.get("WL_PRUNE_BENCH_SMOKE") == "1"
if SMOKE:  # a tiny protocol to test the scripts themselves; never written to RESULTS.md
    NSAMPLES, EVAL_TOKENS = 4, 2048


# ============================================================================ inside a child

def status_mib() -> dict:
    s = Path("/proc/self/status").read_text()
    out = {}
    for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
        m = re.search(rf"{k}:\s+(\d+)", s)
        out[k] = int(m.group(1)) / 1024 if m else float("nan")
    return out


def cpu_s() -> float:
    """User + system CPU seconds of this process so far (all its threads)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def materialize(model) -> dict:
    """Copy every parameter and buffer into ordinary (anonymous) memory and drop the file mapping.

    transformers memory-maps safetensors weights; writing into them in place (pruning) then counts
    the file pages *and* their copy-on-write copies, about one model more than the tool holds.
    Both tools' models are materialized the same way before the timed phase."""
    import gc

    import torch
    from weightlab.engine.memory import release_freed_memory

    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            t.data = t.data.clone()
    gc.collect()
    release_freed_memory()
    return status_mib()


def sha(t) -> str:
    import hashlib

    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


def model_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def child_setup(spec_path: str) -> tuple[dict, dict]:
    """(spec, result skeleton) for a child: weightlab's src/ on the path, versions recorded."""
    spec = json.loads(Path(spec_path).read_text())
    sys.path.insert(0, spec["src"])
    os.environ.setdefault("WEIGHTLAB_PROGRESS", "0")
    res = {k: spec[k] for k in ("tool", "method") if k in spec}
    res["python"] = sys.executable
    res["versions"] = {k: C.package_version(k) for k in VERSIONS}
    res["loadavg_start"] = os.getloadavg()[0]
    return spec, res


class Phase:
    """Times one phase of a child (wall and CPU seconds) and its own peak RSS (the counter is reset first)."""

    def __init__(self, res: dict, name: str):
        self.res, self.name = res, name

    def __enter__(self):
        self.res[f"{self.name}_peak_reset"] = reset_peak()
        self.res[f"rss_before_{self.name}_mib"] = status_mib()["VmRSS"]
        self.c0, self.t0 = cpu_s(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.res[f"{self.name}_s"] = time.perf_counter() - self.t0
        self.res[f"{self.name}_cpu_s"] = cpu_s() - self.c0
        st = status_mib()
        self.res[f"{self.name}_peak_mib"] = st["VmHWM"]
        self.res[f"rss_after_{self.name}_mib"] = st["VmRSS"]
        return False


def eval_perplexity(model, tok, heldout: str, seqlen: int = SEQLEN, max_tokens: int = EVAL_TOKENS) -> dict:
    """weightlab.engine.evaluate.perplexity in either venv (the same code scores both tools)."""
    import torch
    from weightlab.engine.evaluate import perplexity

    ids = tok(heldout, return_tensors="pt", add_special_tokens=False)["input_ids"][0][:max_tokens]
    r = perplexity(model, tok, heldout, seqlen=seqlen, max_tokens=max_tokens, batch_size=EVAL_BATCH,
                   show_progress=False)
    r["eval_ids_sha"] = sha(ids)
    r["threads"] = torch.get_num_threads()
    return r


def child_finish(res: dict, out_dir: Path, tag: str, t_start: float) -> int:
    res["child_s"] = time.perf_counter() - t_start
    res["child_cpu_s"] = cpu_s()
    res["loadavg_end"] = os.getloadavg()[0]
    if "torch" in sys.modules:
        res["torch_threads"] = sys.modules["torch"].get_num_threads()
    (Path(out_dir) / f"result_{tag}.json").write_text(json.dumps(res, indent=1))
    return 0


# ============================================================================ driver

def lc_python(arg: str | None) -> str:
    """The llm-compressor interpreter (--lc-python, $WEIGHTLAB_LC_PYTHON, or .venv-lc), checked to import it."""
    cand = arg or os.environ.get("WEIGHTLAB_LC_PYTHON") or str(LC_VENV / "bin" / "python")
    if not Path(cand).is_file():
        sys.exit(f"llm-compressor's interpreter not found at {cand}.\n"
                 f"Create its separate venv once, from the repository root:\n    {LC_SETUP}\n"
                 "or pass --lc-python / set $WEIGHTLAB_LC_PYTHON (or run weightlab alone with --skip-lc).")
    r = subprocess.run([cand, "-c", "import llmcompressor, importlib.metadata as m; print(m.version('llmcompressor'))"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{cand} cannot import llmcompressor:\n{r.stderr.strip().splitlines()[-1] if r.stderr else ''}\n"
                 f"Install it there: {LC_SETUP}")
    return cand


def child_env(threads: int | None = None) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "WEIGHTLAB_PROGRESS": "0", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if threads:  # on a shared, oversubscribed machine spinning OpenMP threads distort both tools alike
        env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    return env


def add_threads_arg(ap) -> None:
    ap.add_argument("--threads", type=int, default=int(os.environ.get("WL_BENCH_THREADS", "0")) or None,
                    help="torch threads in every child, the same for both tools (default: torch's own choice)")


def run_child(script: str | Path, spec: dict, work: Path, python: str, threads: int | None = None,
              env: dict | None = None) -> tuple[dict, C.Run]:
    """Run `python SCRIPT _child spec.json` measured (``env``: extra variables); the child writes
    result_{tag}.json into ``work``."""
    tag = spec["tag"]
    spec = {**spec, "out_dir": str(work), "src": str(C.REPO_ROOT / "src")}
    sp = work / f"spec_{tag}.json"
    sp.write_text(json.dumps(spec))
    cwd = work / f"cwd_{tag}"
    cwd.mkdir(exist_ok=True)  # llm-compressor may write logs into its working directory
    cr = C.run_measured([python, str(Path(script).resolve()), "_child", str(sp)], env={**child_env(threads), **(env or {})}, cwd=cwd)
    cr.check(tag)
    res = json.loads((work / f"result_{tag}.json").read_text())
    res["wall_s"], res["peak_rss_mib"], res["rss_source"] = cr.wall_s, cr.peak_rss_mib, cr.rss_source
    res["tag"] = tag
    (work / f"result_{tag}.json").write_text(json.dumps(res, indent=1))
    return res, cr


def prepare_smollm2(work: Path) -> dict:
    """The SmolLM2 calibration ids (the first NSAMPLES x SEQLEN tokens of the zoo's calibration split,
    consecutive windows, checked equal to weightlab's sampling='consecutive') and the held-out text."""
    import torch
    from transformers import AutoTokenizer

    from weightlab.engine.calib_data import token_windows
    from weightlab.zoo import smollm2, wiki_text

    model_dir = smollm2()
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    calib = wiki_text("calib")
    ids = tok(calib, add_special_tokens=False)["input_ids"][: NSAMPLES * SEQLEN]
    ids = torch.tensor(ids, dtype=torch.int64).view(NSAMPLES, SEQLEN)
    if not torch.equal(ids, token_windows(tok, calib, NSAMPLES, SEQLEN, sampling="consecutive")):
        raise SystemExit("calibration ids differ from weightlab's token_windows(sampling='consecutive')")
    torch.save(ids, work / "calib_ids.pt")
    (work / "heldout.txt").write_text(wiki_text("heldout"), encoding="utf-8")
    return {"model_dir": str(model_dir), "ids_path": str(work / "calib_ids.pt"),
            "heldout_path": str(work / "heldout.txt"), "calib_chars": len(calib),
            "calib_ids_sha": sha(ids), "matches_consecutive": True}


def load_ids(path: str, shape: tuple[int, int]):
    import torch

    ids = torch.load(path, weights_only=True)
    assert ids.dtype == torch.int64 and tuple(ids.shape) == shape, ids.shape
    return ids


def loadavg_range(results: list[dict]) -> tuple[float, float]:
    loads = [x for r in results for x in (r.get("loadavg_start"), r.get("loadavg_end")) if x is not None]
    return min(loads, default=0.0), max(loads, default=0.0)


def fmt(x, nd=1) -> str:
    return "n/a" if x is None else f"{x:,.{nd}f}"


def add_notes(body: str, notes: list[str] | None) -> str:
    """The section with the operator's --note lines (how the run was done) after its first line."""
    if not notes:
        return body
    first, _, rest = body.partition("\n")
    return "\n".join([first, *(f"Run note: {n}" for n in notes), rest])


def publish(body: str, work: Path, section: str, write: bool, keep: bool) -> int:
    """Print the rendered section, keep a copy in the work folder, write it to RESULTS.md when asked."""
    print("\n" + body)
    (work / "section.md").write_text(body)
    if write:
        C.write_section(section, body)
        C.log(f"wrote the '{section}' section of {C.RESULTS_MD}")
    if not keep:
        C.rmtree(work)
    return 0
