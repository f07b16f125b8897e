"""The CLI: info on every format, JSON output, errors without tracebacks, recipes."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import weightlab as wl
from weightlab.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "weightlab", *map(str, args)], capture_output=True, text=True)


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps({"architectures": ["TinyNet"], "hidden_size": 4}))
    return wl.save_state_dict({"w": torch.randn(4, 4), "b": torch.zeros(4), "n": torch.tensor(3)},
                              tmp_path / "model", template=tmp_path / "src", max_shard_size=64)


def test_version():
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"weightlab {wl.__version__}"


def test_info_json_sharded_folder(folder, capsys):
    assert main(["info", str(folder), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["format"] == "hf-sharded" and d["num_parameters"] == 16 + 4 + 1
    assert d["architecture"] == "TinyNet" and len(d["files"]) > 1
    assert {t["name"]: t for t in d["tensors"]}["w"] == {"name": "w", "shape": [4, 4], "dtype": "float32"}


@pytest.mark.parametrize("kind", ["safetensors", "bin", "peft"])
def test_info_other_formats(tmp_path, kind, capsys):
    sd = {"x": torch.ones(2, 3)}
    if kind == "safetensors":
        path = tmp_path / "m.safetensors"
        save_file(sd, path)
    elif kind == "bin":
        path = tmp_path / "m.bin"
        torch.save(sd, path)
    else:
        path = tmp_path
        save_file(sd, path / "adapter_model.safetensors")
        (path / "adapter_config.json").write_text("{}")
    assert main(["info", str(path), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["num_parameters"] == 6 and d["tensors"] == [{"name": "x", "shape": [2, 3], "dtype": "float32"}]
    assert main(["info", str(path)]) == 0
    assert "parameters" in capsys.readouterr().out


def test_errors_have_no_traceback(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    for args in (["info", tmp_path / "bad.safetensors"], ["info", tmp_path / "missing"],
                 ["methods", "--family", "nope"], ["run", tmp_path / "none.yaml"]):
        r = run_cli(*args)
        assert r.returncode == 1, args
        assert "Traceback" not in r.stderr and "error:" in r.stderr, r.stderr
    assert "bad.safetensors" in run_cli("info", tmp_path / "bad.safetensors").stderr


def test_methods_lists_registry(capsys):
    assert main(["methods", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = {(r["family"], r["name"]) for r in rows}
    assert ("compress", "cast") in names and ("inspect", "stats") in names
    cast = next(r for r in rows if r["name"] == "cast")
    assert cast["defaults"]["dtype"] == "bfloat16" and cast["regime"] == "streaming"


def test_run_recipe_cast_and_stats(folder, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
model: {folder}
output: {tmp_path / 'out'}
steps:
  - {{family: compress, method: cast, params: {{dtype: bfloat16}}}}
  - {{family: inspect, method: stats}}
""")
    assert main(["run", str(recipe)]) == 0
    out = wl.open_checkpoint(tmp_path / "out")
    assert out.info("w").dtype == torch.bfloat16 and out.info("n").dtype == torch.int64
    assert torch.equal(out.get("w"), wl.open_checkpoint(folder).get("w").bfloat16())
    rep = json.loads((tmp_path / "out" / "report-02-inspect-stats.json").read_text())
    assert {r["name"]: r for r in rep["layers"]}["w"]["dtype"] == "bfloat16"  # stats saw the cast model
    assert (tmp_path / "out" / "config.json").is_file()  # template copied from the input folder


def test_recipe_errors_listed_before_anything_runs(folder, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
model: {folder}
output: {tmp_path / 'out'}
steps:
  - {{family: compress, method: castt}}
  - {{family: compress, method: cast, params: {{dtype: int3}}}}
  - {{family: merge2, method: x}}
""")
    r = run_cli("run", recipe)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "step 1" in r.stderr and "Did you mean 'cast'" in r.stderr
    assert "step 2" in r.stderr and "step 3" in r.stderr
    assert not (tmp_path / "out").exists()


def test_recipe_refuses_output_over_input(folder, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {folder}\noutput: {folder}\nsteps: [{{family: compress, method: cast}}]\n")
    r = run_cli("run", recipe, "--force")
    assert r.returncode == 1 and "input" in r.stderr
    assert wl.open_checkpoint(folder).info("w").dtype == torch.float32


def _all_options():
    import typer.main

    from weightlab.cli import app

    def walk(c, path):
        if hasattr(c, "commands"):
            for n, sub in c.commands.items():
                yield from walk(sub, f"{path} {n}")
        else:
            for p in c.params:
                if getattr(p, "param_type_name", "") == "option":
                    yield path.strip(), p

    return list(walk(typer.main.get_command(app), ""))


def test_one_meaning_per_short_flag_and_json_option():
    meaning: dict[str, set] = {}
    for cmd, p in _all_options():
        longs = [o for o in p.opts if o.startswith("--")]
        for short in (o for o in p.opts if len(o) == 2):
            meaning.setdefault(short, set()).add(longs[0] if longs else short)
        if "--json" in p.opts:
            assert not p.is_flag and p.metavar == "FILE|-", f"{cmd}: --json must take FILE|-"
    assert {k: v for k, v in meaning.items() if len(v) > 1} == {}
    assert meaning["-o"] == {"--out"} and meaning["-p"] == {"--param"} and meaning["-b"] == {"--bits"}


def test_json_to_stdout_bare_or_dash_and_to_a_file(folder, tmp_path, capsys):
    for args in (["--json"], ["--json", "-"]):
        assert main(["info", str(folder), *args]) == 0
        assert json.loads(capsys.readouterr().out)["num_tensors"] > 0
    assert main(["info", "--json", str(tmp_path / "i.json"), str(folder)]) == 0
    assert json.loads((tmp_path / "i.json").read_text())["num_tensors"] > 0


def test_quiet_prints_nothing_but_json_and_errors(folder, capsys, monkeypatch):
    from weightlab.cli._common import console

    monkeypatch.setattr(console, "quiet", False)
    monkeypatch.setenv("WEIGHTLAB_PROGRESS", "1")
    assert main(["--quiet", "info", str(folder)]) == 0
    assert capsys.readouterr().out == ""
    assert main(["-q", "info", str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_tensors"] > 0
    assert main(["-q", "info", str(folder / "missing")]) == 1
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("command,option,family,kinds", [
    ("prune", "--method", "compress", ("prune",)), ("prune", "--allocation", "compress", ("allocate",)),
    ("quantize", "--method", "compress", ("quantize",)), ("tune", "--adapter", "adapt", ("adapter",)),
    ("score-data", "--method", "data", ("score",)), ("tune", "--reweight", "data", ("reweighter", "loss"))])
def test_cli_choice_lists_name_every_registered_method(command, option, family, kinds):
    """The help's choice lists are checked against the registry (generating them at startup would import every
    family for every command, ~0.8 s)."""
    import re

    from weightlab.registry import list_methods

    helps = [p.help for cmd, p in _all_options() if cmd == command and option in p.opts]
    assert helps, f"{command} {option}"
    listed = set(re.findall(r"[a-z][a-z0-9-]*", helps[0]))
    want = {s.name for s in list_methods(family) if s.kind in kinds}
    assert want and not want - listed, f"{command} {option} does not list {sorted(want - listed)}"


@pytest.mark.parametrize("args,needle", [
    ([], "Usage: weightlab"), (["prune"], "Missing argument"), (["info", "--bogus", "x"], "No such option"),
    (["nosuchcmd"], "No such command"), (["prune", "x", "--sparsity", "abc", "-o", "y"], "Invalid value"),
    (["neurons"], "Usage: weightlab neurons")])
def test_usage_errors_print_usage_and_exit_2_without_traceback(args, needle, capsys):
    assert main(args) == 2
    cap = capsys.readouterr()
    text = cap.out + cap.err  # typer's rich help prints to stdout, errors to stderr
    assert needle in text and "Traceback" not in text


def test_names_from_files_are_not_rich_markup(tmp_path, capsys):
    from safetensors.torch import save_file

    save_file({"[/]": torch.zeros(2), "[bold]x": torch.zeros(3)}, str(tmp_path / "m.safetensors"))
    assert main(["info", str(tmp_path / "m.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "[/]" in out and "[bold]x" in out
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"[a]\":1}")
    assert main(["info", str(tmp_path / "bad.safetensors")]) == 1
    assert "bad.safetensors" in capsys.readouterr().err


def test_methods_fits_80_columns_and_shows_one_method_in_full(capsys, monkeypatch):
    from weightlab.cli._common import console

    monkeypatch.setattr(console, "_width", 80)
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) < 100 and all(len(x) <= 80 for x in lines)
    assert main(["methods", "gptq"]) == 0
    out = capsys.readouterr().out
    assert "percdamp = 0.01" in out and "Frantar" in out
    assert main(["methods", "nosuch"]) == 1
