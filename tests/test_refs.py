"""Model references: paths, Hugging Face cache layouts and hub ids, resolved offline."""
import os

import pytest
import torch
from safetensors.torch import save_file

from weightlab.errors import ConfigError
from weightlab.io.reader import open_checkpoint
from weightlab.io.refs import resolve_model


def _hub_cache(root, repo="org/tiny", rev="abc123"):
    """The layout huggingface_hub writes: snapshots/REV/* are symlinks into ../../blobs."""
    base = root / f"models--{repo.replace('/', '--')}"
    blobs, snap = base / "blobs", base / "snapshots" / rev
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    save_file({"w": torch.arange(4.0).reshape(2, 2)}, str(blobs / "b1"))
    (blobs / "b2").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    os.symlink("../../blobs/b1", snap / "model.safetensors")
    os.symlink("../../blobs/b2", snap / "config.json")
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(rev)
    return base, snap


def test_cache_root_and_hub_id_resolve_to_the_snapshot_offline(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    base, snap = _hub_cache(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model(str(base)) == snap
    assert resolve_model("org/tiny").resolve() == snap.resolve()
    with open_checkpoint(resolve_model("org/tiny")) as ck:  # symlinked shards read like files
        assert torch.equal(ck.get("w"), torch.arange(4.0).reshape(2, 2))
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE"):
        resolve_model("org/not-cached")


def test_plain_paths_are_left_alone(tmp_path):
    assert resolve_model(str(tmp_path)) == tmp_path
    assert resolve_model(str(tmp_path / "missing")) == tmp_path / "missing"  # the reader reports it
