"""Every reader/writer format round-trips bit-exactly; sharding, index, template, provenance."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import weightlab as wl
from weightlab.io import CheckpointWriter, Provenance
from conftest import assert_same


def test_single_safetensors_file(tmp_path, sample_sd):
    save_file({k: v.contiguous() for k, v in sample_sd.items()}, tmp_path / "x.safetensors", metadata={"a": "b"})
    ck = wl.open_checkpoint(tmp_path / "x.safetensors")
    assert ck.format == "safetensors" and ck.metadata == {"a": "b"}
    assert set(ck.names()) == set(sample_sd)
    for k, v in sample_sd.items():
        assert ck.info(k).shape == tuple(v.shape) and ck.info(k).dtype == v.dtype
        assert_same(ck.get(k), v)


def test_writer_output_reads_back_with_safetensors_library(tmp_path, sample_sd):
    out = wl.save_state_dict(sample_sd, tmp_path / "m")
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    loaded = load_file(out / "model.safetensors")
    for k, v in sample_sd.items():
        assert_same(loaded[k], v)


@pytest.mark.parametrize("shard", [1, 64, 300, "1KB"])
def test_sharded_roundtrip_and_index(tmp_path, sample_sd, shard):
    out = wl.save_state_dict(sample_sd, tmp_path / "m", max_shard_size=shard)
    ck = wl.open_checkpoint(out)
    for k, v in sample_sd.items():
        assert_same(ck.get(k), v)
    shards = sorted(out.glob("model-*.safetensors"))
    if len(shards) > 1:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(sample_sd)
        assert set(index["weight_map"].values()) == {s.name for s in shards}
        assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in sample_sd.values())
        assert all(s.name.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
        for s in shards:  # each shard alone is a valid safetensors file
            part = load_file(s)
            assert all(index["weight_map"][k] == s.name for k in part)
        if isinstance(shard, int):  # no shard exceeds the limit unless one tensor alone does
            for s in shards:
                part = load_file(s)
                if len(part) > 1:
                    assert sum(t.numel() * t.element_size() for t in part.values()) <= shard
    assert ck.format == ("hf-sharded" if len(shards) > 1 else "hf")


def test_torch_bin_zip_and_legacy(tmp_path, sample_sd):
    sd = {k: v for k, v in sample_sd.items() if k != "fp8"}
    torch.save(sd, tmp_path / "new.bin")
    torch.save(sd, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "wrapped.pth")
    for name in ("new.bin", "old.pt", "wrapped.pth"):
        ck = wl.open_checkpoint(tmp_path / name)
        assert ck.format == "torch"
        for k, v in sd.items():
            assert_same(ck.get(k), v)


def test_hf_folder_with_config_and_bin(tmp_path, sample_sd):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 8}))
    torch.save({k: v for k, v in sample_sd.items() if k != "fp8"}, tmp_path / "pytorch_model.bin")
    ck = wl.open_checkpoint(tmp_path)
    assert ck.format == "hf" and ck.architecture == "LlamaForCausalLM" and ck.config["hidden_size"] == 8


def test_peft_adapter_folder(tmp_path):
    sd = {"base_model.model.q_proj.lora_A.weight": torch.randn(4, 16),
          "base_model.model.q_proj.lora_B.weight": torch.zeros(16, 4)}
    save_file(sd, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    ck = wl.open_checkpoint(tmp_path)
    assert ck.format == "peft-adapter" and ck.config["r"] == 4
    for k, v in sd.items():
        assert_same(ck.get(k), v)


def test_reading_is_lazy_and_memory_mapped(tmp_path):
    big = {"w": torch.randn(256, 256)}
    out = wl.save_state_dict(big, tmp_path / "m")
    ck = wl.open_checkpoint(out)
    t = ck.get("w")
    t.mul_(0)  # copy-on-write mapping: the file must not change
    assert torch.equal(wl.open_checkpoint(out).get("w"), big["w"])


def test_template_files_and_provenance(tmp_path, sample_sd):
    tpl = tmp_path / "tpl"
    tpl.mkdir()
    (tpl / "config.json").write_text('{"architectures": ["X"]}')
    (tpl / "tokenizer.json").write_text("{}")
    (tpl / "model.safetensors").write_bytes(b"not copied")
    prov = Provenance(method="merge/ties", params={"density": 0.5}, inputs=["a", "b"], command="weightlab merge x")
    with CheckpointWriter(tmp_path / "out", template=tpl, provenance=prov, max_shard_size=100) as w:
        for k, v in sample_sd.items():
            w.add(k, v)
    out = tmp_path / "out"
    assert (out / "config.json").read_text() == '{"architectures": ["X"]}'
    assert (out / "tokenizer.json").is_file()
    ck = wl.open_checkpoint(out)
    back = Provenance.from_metadata(ck.metadata)
    assert back.method == "merge/ties" and back.params == {"density": 0.5} and back.inputs == ["a", "b"]
    assert ck.metadata["format"] == "pt"
    readme = (out / "README.md").read_text()
    assert "merge/ties" in readme and "density" in readme


def test_writer_dtype_casts_floats_only(tmp_path, sample_sd):
    out = wl.save_state_dict(sample_sd, tmp_path / "m", dtype="bf16")
    ck = wl.open_checkpoint(out)
    assert ck.info("model.layers.0.mlp.weight").dtype == torch.bfloat16
    assert ck.info("bn.num_batches_tracked").dtype == torch.int64
    assert_same(ck.get("codes"), sample_sd["codes"])


def test_duplicate_tensor_name_rejected(tmp_path):
    with pytest.raises(wl.CheckpointError, match="twice"):
        with CheckpointWriter(tmp_path / "m") as w:
            w.add("a", torch.zeros(2))
            w.add("a", torch.zeros(2))
    assert not (tmp_path / "m").exists()


def test_config_json_records_the_dtype_actually_stored(tmp_path):
    import json

    import torch

    import weightlab as wl
    from weightlab.cli import main

    tpl = tmp_path / "tpl"
    tpl.mkdir()
    (tpl / "config.json").write_text(json.dumps({"architectures": ["Toy"], "torch_dtype": "float32"}))
    src = wl.save_state_dict({"w": torch.randn(4, 4), "step": torch.tensor(3)}, tmp_path / "m", template=tpl)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {src}\noutput: {tmp_path / 'bf16'}\nsteps: [{{family: compress, method: cast, "
                      "params: {dtype: bfloat16}}]\n")
    assert main(["run", str(recipe)]) == 0
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert main(["merge", "--method", "linear", str(src), str(src), "--dtype", "float16", "-o",
                 str(tmp_path / "f16")]) == 0
    assert json.loads((tmp_path / "f16" / "config.json").read_text())["torch_dtype"] == "float16"
