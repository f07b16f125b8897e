"""How an output was made: recorded in safetensors metadata and a short README.md."""
from __future__ import annotations

import datetime as _dt
import json
import shlex
import sys
from dataclasses import dataclass, field

from .._version import __version__


@dataclass
class Provenance:
    method: str = ""
    params: dict = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)
    command: str | None = None

    def __post_init__(self) -> None:
        if self.command is None:
            self.command = " ".join(shlex.quote(a) for a in ["weightlab", *sys.argv[1:]]) if _is_cli() else ""

    def metadata(self) -> dict[str, str]:
        return {
            "weightlab.version": __version__,
            "weightlab.method": self.method,
            "weightlab.params": json.dumps(self.params, sort_keys=True, default=str),
            "weightlab.inputs": json.dumps([str(i) for i in self.inputs]),
            "weightlab.command": self.command or "",
        }

    def readme(self, title: str = "weightlab output") -> str:
        lines = [f"# {title}", "", "Made by [weightlab](https://pypi.org/project/weightlab/).", "",
                 f"- weightlab version: {__version__}",
                 f"- created: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')}",
                 f"- method: `{self.method or 'n/a'}`"]
        if self.inputs:
            lines.append("- inputs:")
            lines += [f"  - `{i}`" for i in self.inputs]
        if self.command:
            lines.append(f"- command: `{self.command}`")
        lines += ["", "## Parameters", "", "```json", json.dumps(self.params, indent=2, sort_keys=True, default=str),
                  "```", ""]
        return "\n".join(lines)

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> "Provenance | None":
        if "weightlab.method" not in meta:
            return None
        return cls(method=meta.get("weightlab.method", ""),
                   params=json.loads(meta.get("weightlab.params", "{}")),
                   inputs=json.loads(meta.get("weightlab.inputs", "[]")),
                   command=meta.get("weightlab.command", ""))


def _is_cli() -> bool:
    return bool(sys.argv) and sys.argv[0].endswith("weightlab")
