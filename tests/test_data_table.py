"""Score tables, files, pruning helpers, CSV datasets and the `score-data` command."""
import csv
import json
import math

import pytest
import torch

import weightlab as wl
from weightlab import data as D
import weightlab.cli.data  # noqa: F401  (registers score-data until cli/__init__ imports it)
from weightlab.cli import main
from weightlab.data import table as T


def _table():
    scores = torch.tensor([0.3, math.inf, 0.1, 0.9, 0.5, 0.2], dtype=torch.float64)
    return D.ScoreTable("forgetting", scores, torch.tensor([0, 1, 1, 0, 2, 2]), dataset="toy",
                        extra={"never_learned_runs": torch.tensor([0, 2, 0, 0, 0, 0])})


# ----------------------------------------------------------------------------- pruning

def test_keep_policies():
    s = torch.tensor([0.3, math.inf, 0.1, 0.9, 0.5, 0.2])
    assert D.keep_indices(s, 0.5, "hard").tolist() == [1, 3, 4]
    assert D.keep_indices(s, 0.5, "easy").tolist() == [0, 2, 5]
    assert D.keep_indices(s, 0.5, "hard", skip_hardest=1 / 6).tolist() == [0, 3, 4]  # drops the inf first
    r = D.keep_indices(s, 0.5, "random", seed=1)
    assert len(r) == 3 and torch.equal(r, D.keep_indices(s, 0.5, "random", seed=1))
    assert D.keep_indices(s, 1.0, "hard").tolist() == list(range(6))
    # auto: few samples per class -> easy; many -> hard
    assert torch.equal(D.keep_indices(s, 0.5, "auto", num_classes=3), D.keep_indices(s, 0.5, "easy"))
    assert torch.equal(D.keep_indices(s, 0.5, "auto", num_classes=1, abundant_per_class=5),
                       D.keep_indices(s, 0.5, "hard"))
    with pytest.raises(wl.ConfigError, match="fraction"):
        D.keep_indices(s, 0.0)
    with pytest.raises(wl.ConfigError, match="policy"):
        D.keep_indices(s, 0.5, "medium")


def test_keep_class_balanced():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    s = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 20.0, 30.0, 40.0])  # class 1 is all harder
    assert D.keep_indices(s, 0.5, "easy").tolist() == [0, 1, 2, 3]  # plain easy drops class 1 entirely
    assert D.keep_indices(s, 0.5, "easy", labels=labels).tolist() == [0, 1, 4, 5]
    assert D.keep_indices(s, 0.5, "hard", labels=labels).tolist() == [2, 3, 6, 7]
    assert D.keep_indices(s, 0.5, "hard", labels=labels, skip_hardest=0.25).tolist() == [1, 2, 5, 6]
    r = D.keep_indices(s, 0.5, "random", labels=labels, seed=3)
    assert torch.bincount(labels[r]).tolist() == [2, 2]
    t = D.ScoreTable("el2n", s, labels)
    assert t.keep(0.5, "easy", class_balanced=True).tolist() == [0, 1, 4, 5]
    with pytest.raises(wl.ConfigError, match="needs labels"):
        D.ScoreTable("x", s).keep(0.5, class_balanced=True)


def test_keep_ties_break_by_index():
    s = torch.tensor([1.0, 1.0, 1.0, 0.0])
    assert D.keep_indices(s, 0.5, "hard").tolist() == [0, 1]
    assert D.keep_indices(s, 0.5, "easy").tolist() == [2, 3]


def test_table_keep_returns_ids():
    t = _table()
    t.ids = torch.arange(100, 106)
    assert t.keep(0.5, "hard").tolist() == [101, 103, 104]
    mask = t.add_kept_column(0.5, "easy")
    assert mask.tolist() == [True, False, True, False, False, True] and "kept" in t.columns()


# ----------------------------------------------------------------------------- files

def test_csv_json_parquet_files(tmp_path):
    t = _table()
    t.label_names = ["a", "b", "c"]
    rows = list(csv.DictReader(open(t.save(tmp_path / "s.csv"))))
    assert [r["id"] for r in rows] == ["0", "1", "2", "3", "4", "5"]
    assert rows[1]["score"] == "inf" and rows[1]["rank"] == "1" and rows[1]["label"] == "b"
    assert float(rows[3]["score"]) == 0.9 and rows[3]["rank"] == "2"
    doc = json.loads((t.save(tmp_path / "s.json")).read_text())  # strict JSON: inf -> null
    assert doc["columns"] == ["id", "score", "label", "rank", "never_learned_runs"]
    assert doc["rows"][1] == {"id": 1, "score": None, "label": "b", "rank": 1, "never_learned_runs": 2}
    pq = pytest.importorskip("pyarrow.parquet")
    tab = pq.read_table(t.save(tmp_path / "s.parquet")).to_pydict()
    assert tab["score"][1] == math.inf and tab["rank"] == [4, 1, 6, 2, 3, 5]
    with pytest.raises(wl.OutputExistsError):
        t.save(tmp_path / "s.csv")
    t.save(tmp_path / "s.csv", force=True)
    with pytest.raises(wl.ConfigError, match="format"):
        t.save(tmp_path / "s.xlsx")


def test_parquet_without_pyarrow_or_pandas(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def fake(name, *a, **k):
        if name.split(".")[0] in ("pyarrow", "pandas"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(wl.MissingDependencyError, match="pip install pyarrow"):
        _table().save(tmp_path / "s.parquet")
    assert not (tmp_path / "s.parquet").exists() and list(tmp_path.iterdir()) == []


def test_histogram_plot(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    p = _table().plot(tmp_path / "h.png", highlight=torch.tensor([1, 0, 0, 1, 0, 0]).bool())
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def missing():
        raise wl.MissingDependencyError("matplotlib", "Plotting score histograms", "'weightlab[plot]'")

    monkeypatch.setattr(T, "pyplot", missing)
    with pytest.raises(wl.MissingDependencyError, match=r"weightlab\[plot\]"):
        _table().plot(tmp_path / "h2.png")


# ----------------------------------------------------------------------------- CSV datasets

def test_read_csv_dataset(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("id,f1,label,f2\nr1,1.0,cat,5\nr2,2.0,dog,5\nr3,3.0,cat,5\n")
    d = D.read_csv_data(f)
    assert d.feature_names == ["f1", "f2"] and d.label_names == ["cat", "dog"] and d.num_classes == 2
    assert d.y.tolist() == [0, 1, 0] and d.source_ids == ["r1", "r2", "r3"]
    assert torch.allclose(d.x[:, 0], torch.tensor([-1.2247, 0.0, 1.2247]), atol=1e-4)
    assert torch.equal(d.x[:, 1], torch.zeros(3))  # constant feature stays 0
    f.write_text("a,label\n1,10\n2,2\n3,10\n")
    assert D.read_csv_data(f).label_names == [2, 10]  # numeric labels sort numerically


@pytest.mark.parametrize("text, msg", [
    ("a,b\n1,2\n3,4\n", "no 'label' column"),
    ("a,label\n1,x\nfoo,y\n", "line 3, column 'a': 'foo' is not a number"),
    ("a,label\n1,x\nnan,y\n", "not a finite number"),
    ("a,label\n1,x\n2,x\n", "only one class"),
    ("a,label\n1,x\n2\n", "line 3 has 1 fields"),
    ("", "empty"),
])
def test_read_csv_errors(tmp_path, text, msg):
    f = tmp_path / "bad.csv"
    f.write_text(text)
    with pytest.raises(wl.ConfigError, match=msg):
        D.read_csv_data(f)


# ----------------------------------------------------------------------------- CLI

def test_cli_score_data_zoo_dataset(tmp_path, capsys):
    out, png = tmp_path / "s.csv", tmp_path / "s.png"
    rc = main(["score-data", "--method", "el2n", "--dataset", "digits", "--runs", "1", "--epochs", "1",
               "-o", str(out), "--plot", str(png), "--label-noise", "0.1", "--keep", "0.8", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == 1347 and summary["auroc_noisy"] > 0.9 and summary["kept"] == 1078
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 1347 and {"id", "score", "label", "rank", "noisy", "kept"} <= set(rows[0])
    assert png.stat().st_size > 1000


def test_cli_score_data_csv_file_and_errors(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    f = tmp_path / "mine.csv"
    x = torch.randn(60, 3, generator=g)
    lines = ["x1,x2,x3,label"] + [f"{a:.4f},{b:.4f},{c:.4f},{'yes' if a > 0 else 'no'}" for a, b, c in x.tolist()]
    f.write_text("\n".join(lines) + "\n")
    out = tmp_path / "s.json"
    assert main(["score-data", "-m", "grand", "-d", str(f), "-o", str(out), "--runs", "1", "--epochs", "0"]) == 0
    doc = json.loads(out.read_text())
    assert len(doc["rows"]) == 60 and {r["label"] for r in doc["rows"]} == {"yes", "no"}
    capsys.readouterr()
    # user errors: one line, exit 1, no traceback, nothing written
    assert main(["score-data", "-m", "grand", "-d", str(f), "-o", str(out)]) == 1  # exists
    assert main(["score-data", "-m", "prototype", "-d", str(f), "-o", str(tmp_path / "p.csv"), "--runs", "2"]) == 1
    assert main(["score-data", "-m", "el2m", "-d", "digits", "-o", str(tmp_path / "e.csv")]) == 1
    assert main(["score-data", "-m", "el2n", "-d", str(tmp_path / "nope.csv"), "-o", str(tmp_path / "e.csv")]) == 1
    assert main(["score-data", "-m", "el2n", "-d", "digits", "-o", str(tmp_path / "e.txt")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 5
    assert "exists" in err and "does not apply to prototype" in err and "Did you mean 'el2n'" in err
    assert not (tmp_path / "e.csv").exists() and not (tmp_path / "p.csv").exists()


def test_cli_prototype_on_wine(tmp_path, capsys):
    out = tmp_path / "p.csv"
    assert main(["score-data", "-m", "prototype", "-d", "wine", "-o", str(out), "-p", "k=3"]) == 0
    assert "prototype on wine" in capsys.readouterr().out
    rows = list(csv.DictReader(open(out)))
    assert len(rows) > 100 and {r["cluster"] for r in rows} == {"0", "1", "2"}
