"""The README's merge commands run as written (offline, on the zoo's digits models)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
ROOT = README.parent
pytest.importorskip("sklearn")
pytestmark = pytest.mark.slow  # seven CLI subprocesses


def _block_after(heading: str, lang: str) -> str:
    text = README.read_text()
    section = text.split(heading, 1)[1]
    return re.search(rf"```{lang}\n(.*?)```", section, re.S).group(1)


def test_readme_merge_commands_run(tmp_path):
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    for line in _block_after("## Merging", "bash").splitlines():
        cmd = line.split("#")[0].split()
        assert cmd[0] == "weightlab"
        r = subprocess.run([sys.executable, "-m", "weightlab", *cmd[1:]], cwd=tmp_path, capture_output=True, text=True)
        assert r.returncode == 0, f"{line}\n{r.stderr}"
    code = _block_after("## Merging", "python")
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)
    for out in ("merged-ties", "merged-mergekit", "merged-slerp", "merged-tsv", "patched", "restored", "forget-ft0"):
        assert (tmp_path / out / "model.safetensors").is_file(), out
