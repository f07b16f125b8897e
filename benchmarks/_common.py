"""Shared helpers for the benchmarks: timing a child process, its peak RSS, writing results.

Every tool under test runs in its own child process, so that its wall time includes its
own start-up and its peak RSS is its own (not the benchmark driver's, not another tool's).

Peak RSS comes from ``/usr/bin/time -v`` when it exists (its "Maximum resident set size"
is the max over the measured process and the descendants it waited for), else from
``os.wait4`` on the child, whose rusage is that child's own (plus its waited-for children).
Either way the benchmark driver's own memory is never counted.
"""
from __future__ import annotations

import datetime as _dt
import fcntl
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_MD = BENCH_DIR / "RESULTS.md"
RESULTS_HEADER = (
    "# weightlab benchmarks\n\n"
    "Each section is written by the benchmark script it names; rerun that script to update it.\n"
    "Numbers depend on the machine (stated in each section) and are noisy on shared machines.\n"
)
GNU_TIME = "/usr/bin/time"


@dataclass
class Run:
    """One measured child process."""

    cmd: list[str]
    wall_s: float
    peak_rss_mib: float
    returncode: int
    stdout: str = ""
    stderr: str = ""
    rss_source: str = ""

    def check(self, what: str = "") -> "Run":
        if self.returncode != 0:
            tail = "\n".join((self.stderr or self.stdout).splitlines()[-40:])
            raise RuntimeError(f"{what or self.cmd[0]} failed (exit {self.returncode}):\n"
                               f"$ {' '.join(self.cmd)}\n{tail}")
        return self


def _has_gnu_time() -> bool:
    if not os.access(GNU_TIME, os.X_OK):
        return False
    try:
        r = subprocess.run([GNU_TIME, "-v", "true"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "Maximum resident set size" in r.stderr


def run_measured(cmd: list[str], *, env: dict | None = None, cwd: str | os.PathLike | None = None,
                 use_gnu_time: bool | None = None) -> Run:
    """Run ``cmd`` as a child process; return its wall time and peak RSS (MiB).

    stdout/stderr are captured into temporary files (never pipes, which could block a
    chatty child). Wall time is measured around the child here with perf_counter.
    """
    if use_gnu_time is None:
        use_gnu_time = _has_gnu_time()
    with tempfile.TemporaryDirectory(prefix="wl-bench-") as tmp:
        out_p, err_p, time_p = (Path(tmp) / n for n in ("stdout", "stderr", "time"))
        full = [GNU_TIME, "-v", "-o", str(time_p), *cmd] if use_gnu_time else list(cmd)
        with open(out_p, "wb") as fo, open(err_p, "wb") as fe:
            t0 = time.perf_counter()
            proc = subprocess.Popen(full, stdout=fo, stderr=fe, env=env, cwd=cwd)
            # wait4 reaps exactly this child and returns its own resource usage
            _, status, ru = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - t0
            proc.returncode = os.waitstatus_to_exitcode(status)
        stdout = out_p.read_text(errors="replace")
        stderr = err_p.read_text(errors="replace")
        rss_kib, source = None, "os.wait4 ru_maxrss"
        if use_gnu_time and time_p.exists():
            m = re.search(r"Maximum resident set size \(kbytes\):\s*(\d+)", time_p.read_text(errors="replace"))
            if m:
                rss_kib, source = int(m.group(1)), "/usr/bin/time -v"
        if rss_kib is None:
            rss_kib = ru.ru_maxrss  # KiB on Linux
        return Run(cmd=list(cmd), wall_s=wall, peak_rss_mib=rss_kib / 1024, returncode=proc.returncode,
                   stdout=stdout, stderr=stderr, rss_source=source)


@dataclass
class Stats:
    """Repeated runs of one tool on one task."""

    runs: list[Run] = field(default_factory=list)

    @property
    def wall_s(self) -> float:
        """The median wall time over the repeats (with two repeats: their mean)."""
        return statistics.median(r.wall_s for r in self.runs)

    @property
    def wall_min_s(self) -> float:
        return min(r.wall_s for r in self.runs)

    @property
    def peak_rss_mib(self) -> float:
        return max(r.peak_rss_mib for r in self.runs)


def warm_page_cache(paths, chunk: int = 1 << 24) -> int:
    """Read every file under ``paths`` once so that the first timed tool does not pay cold I/O."""
    total = 0
    for p in paths:
        p = Path(p)
        files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())
        for f in files:
            with open(f, "rb") as fh:
                while True:
                    b = fh.read(chunk)
                    if not b:
                        break
                    total += len(b)
    return total


def rmtree(path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def package_version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - not installed / odd metadata
        return "not installed"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def total_ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return None


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine_line() -> str:
    ram = total_ram_gib()
    return (f"{cpu_count()} CPU cores ({cpu_model()}), {ram:.0f} GiB RAM, {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}" if ram else
            f"{cpu_count()} CPU cores ({cpu_model()}), Python {platform.python_version()}")


def load_sentence(loads: list[float]) -> str:
    """How busy the machine was during the runs (1-minute load averages at their starts and ends)."""
    lo, hi = min(loads, default=0.0), max(loads, default=0.0)
    span = f"1-minute load average at the starts/ends of the runs {lo:.1f}-{hi:.1f} on {cpu_count()} cores"
    if hi <= cpu_count() + 0.5:
        return (f"Not overloaded: at most about one busy process per core ({span}); wall and CPU seconds "
                "(user + system) are both given.")
    return (f"Shared and busy: other jobs ran at the same time ({span}), so wall times are inflated and noisy; "
            "CPU seconds (user + system of the process) are less affected and are given next to them.")


def today() -> str:
    return _dt.date.today().isoformat()


def fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(title: str, body: str, path: Path = RESULTS_MD) -> Path:
    """Replace the ``## {title}`` section of ``path`` (up to the next ``## `` heading) with ``body``.

    Other sections are kept as they are; the section is appended if missing and the file is
    created (with a short header) if it does not exist. Written atomically.
    """
    heading = f"## {title}"
    # several benchmark scripts share the file: serialize read-modify-write on its folder
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX)
        return _write_section_locked(path, heading, body)
    finally:
        os.close(dir_fd)  # releases the lock


def _write_section_locked(path: Path, heading: str, body: str) -> Path:
    text = path.read_text(encoding="utf-8") if path.exists() else RESULTS_HEADER
    section = f"{heading}\n\n{body.strip()}\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.rstrip("\n").rstrip() == heading), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
        after = "".join(lines[end:])
        new = "".join(lines[:start]) + section + ("\n" + after if after else "")
    fd, tmp = tempfile.mkstemp(prefix=".RESULTS.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(new)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def python_exe() -> str:
    return sys.executable


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def ratio_verdict(ratios: list[float], target: float, need: int = 3) -> str:
    """The house rule for a timing target on per-pair ratios (tool / anchor): met only when at least ``need``
    alternating pairs all meet it; runs on both sides of the target are "not shown"."""
    if not ratios:
        return "not measured"
    spread = f"{min(ratios):.2f}-{max(ratios):.2f}x over {len(ratios)} pair(s)"
    if len(ratios) < need:
        return f"not shown ({spread}; the rule needs {need})"
    if max(ratios) <= target:
        return f"met ({spread})"
    if min(ratios) > target:
        return f"NOT met ({spread})"
    return f"not shown ({spread} straddle {target}x)"
