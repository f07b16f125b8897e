"""How an output was made: recorded in safetensors metadata and a README.md model card.

Everything written here is meant to be shared, so local paths are reduced to their names
(io/modelcard.py); the object itself keeps the real paths, which the writers use to refuse
writing over an input.
"""
from __future__ import annotations

import datetime as _dt
import json
import shlex
import sys
from dataclasses import dataclass, field

from .._version import __version__
from .modelcard import base_model_of, public_name, render, scrub


@dataclass
class Provenance:
    method: str = ""
    params: dict = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)
    command: str | None = None
    # model-card extras: base_model_relation, library_name, pipeline_tag, tags (list), details (dict of
    # facts shown in the card and kept in its front matter under "weightlab"), warnings (list of lines)
    card: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.command is None:
            self.command = " ".join(shlex.quote(a) for a in ["weightlab", *sys.argv[1:]]) if _is_cli() else ""

    def public_command(self) -> str:
        try:
            return " ".join(shlex.quote(public_name(a)) for a in shlex.split(self.command or ""))
        except ValueError:  # unbalanced quotes in a hand-written command: keep it as given
            return self.command or ""

    def metadata(self) -> dict[str, str]:
        meta = {
            "weightlab.version": __version__,
            "weightlab.method": self.method,
            "weightlab.params": json.dumps(scrub(self.params), sort_keys=True, default=str),
            "weightlab.inputs": json.dumps([public_name(str(i)) for i in self.inputs]),
            "weightlab.command": self.public_command(),
        }
        if self.card.get("details"):
            meta["weightlab.details"] = json.dumps(scrub(self.card["details"]), sort_keys=True, default=str)
        return meta

    def card_data(self) -> dict:
        """The model card's front matter (a plain dict)."""
        c = self.card
        base = base_model_of(self.inputs) if self.inputs else []
        data = {"base_model": base[0] if len(base) == 1 else base,
                "base_model_relation": c.get("base_model_relation") if base else None,
                "library_name": c.get("library_name"), "pipeline_tag": c.get("pipeline_tag"),
                "tags": list(dict.fromkeys(["weightlab", *c.get("tags", [])]))}
        if c.get("details"):
            data["weightlab"] = scrub(c["details"])
        return data

    def readme(self, title: str = "weightlab output") -> str:
        lines = [f"# {title}", "", "Made by [weightlab](https://pypi.org/project/weightlab/).", ""]
        for w in self.card.get("warnings", []):
            lines += [f"> **Warning:** {w}", ""]
        lines += [f"- weightlab version: {__version__}",
                  f"- created: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')}",
                  f"- method: `{self.method or 'n/a'}`"]
        if self.inputs:
            lines.append("- inputs:")
            lines += [f"  - `{public_name(str(i))}`" for i in self.inputs]
        if self.command:
            lines.append(f"- command: `{self.public_command()}`")
        for k, v in (self.card.get("details") or {}).items():
            lines.append(f"- {k}: {json.dumps(scrub(v), default=str) if isinstance(v, (dict, list)) else v}")
        if self.card.get("usage"):
            lines += ["", "## Loading", "", self.card["usage"]]
        lines += ["", "## Parameters", "", "```json",
                  json.dumps(scrub(self.params), indent=2, sort_keys=True, default=str), "```", ""]
        return render(self.card_data(), "\n".join(lines))

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> "Provenance | None":
        if "weightlab.method" not in meta:
            return None
        details = json.loads(meta.get("weightlab.details", "{}"))
        return cls(method=meta.get("weightlab.method", ""),
                   params=json.loads(meta.get("weightlab.params", "{}")),
                   inputs=json.loads(meta.get("weightlab.inputs", "[]")),
                   command=meta.get("weightlab.command", ""), card={"details": details} if details else {})


def _is_cli() -> bool:
    return bool(sys.argv) and sys.argv[0].endswith("weightlab")
