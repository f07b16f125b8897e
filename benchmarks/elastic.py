"""The Elastic benchmarks, one after another: BigNAS, Learngene, D2NWG. Each script writes its own
"Elastic: ..." section of RESULTS.md (see each script's docstring for its protocol and claims).

    .venv/bin/python benchmarks/elastic.py                    # all three (tens of CPU minutes)
    .venv/bin/python benchmarks/elastic.py --only bignas,d2nwg
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = {"bignas": "elastic_bignas.py", "learngene": "elastic_learngene.py", "d2nwg": "elastic_d2nwg.py"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=",".join(SCRIPTS), help="comma-separated subset of " + ", ".join(SCRIPTS))
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(SCRIPTS))
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(SCRIPTS)}")
    failed = []
    for name in names:
        t = time.perf_counter()
        rc = subprocess.call([sys.executable, str(HERE / SCRIPTS[name])])
        print(f"elastic {name}: exit {rc} after {time.perf_counter() - t:.0f} s", flush=True)
        if rc:
            failed.append(name)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
