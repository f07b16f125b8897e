"""Bad input gets a typed error naming the file; outputs are atomic and never clobber inputs."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

import weightlab as wl
from weightlab.io import CheckpointWriter


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['WL_MARKER']}",))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("WL_MARKER", str(marker))
    torch.save({"w": torch.zeros(2), "payload": Evil()}, tmp_path / "evil.bin")
    assert not marker.exists()
    with pytest.raises(wl.UnsafeCheckpointError) as e:
        wl.open_checkpoint(tmp_path / "evil.bin")
    assert "evil.bin" in str(e.value) and "refused" in str(e.value)
    assert not marker.exists()


def test_corrupt_header_is_typed_and_names_file(tmp_path):
    save_file({"w": torch.zeros(4)}, tmp_path / "m.safetensors")
    raw = bytearray((tmp_path / "m.safetensors").read_bytes())
    raw[10:14] = b"\xff\xfe{]"
    (tmp_path / "bad.safetensors").write_bytes(bytes(raw))
    with pytest.raises(wl.CorruptCheckpointError) as e:
        wl.open_checkpoint(tmp_path / "bad.safetensors")
    assert "bad.safetensors" in str(e.value)


def test_truncated_file_is_typed_and_names_file_and_tensor(tmp_path):
    save_file({"a": torch.zeros(4), "b": torch.ones(100)}, tmp_path / "m.safetensors")
    raw = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:-10])
    with pytest.raises(wl.TruncatedCheckpointError) as e:
        wl.open_checkpoint(tmp_path / "cut.safetensors")
    assert "cut.safetensors" in str(e.value) and "'b'" in str(e.value) and "truncated" in str(e.value)
    (tmp_path / "tiny.safetensors").write_bytes(raw[:5])
    with pytest.raises(wl.TruncatedCheckpointError):
        wl.open_checkpoint(tmp_path / "tiny.safetensors")


def test_truncated_torch_file(tmp_path):
    torch.save({"w": torch.randn(1000)}, tmp_path / "m.bin")
    raw = (tmp_path / "m.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(wl.CorruptCheckpointError, match="cut.bin"):
        wl.open_checkpoint(tmp_path / "cut.bin")


def _sharded(tmp_path):
    out = wl.save_state_dict({"a": torch.zeros(100), "b": torch.ones(100)}, tmp_path / "m", max_shard_size=400)
    return out, json.loads((out / "model.safetensors.index.json").read_text())


def test_index_pointing_to_missing_shard(tmp_path):
    out, index = _sharded(tmp_path)
    index["weight_map"]["b"] = "model-00009-of-00009.safetensors"
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(wl.MissingShardError, match="does not exist"):
        wl.open_checkpoint(out)


@pytest.mark.parametrize("evil", ["../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors"])
def test_index_path_traversal_refused(tmp_path, evil):
    out, index = _sharded(tmp_path)
    save_file({"b": torch.ones(100)}, tmp_path / "outside.safetensors")
    index["weight_map"]["b"] = evil
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(wl.MissingShardError, match="outside the checkpoint folder"):
        wl.open_checkpoint(out)


def test_index_naming_tensor_absent_from_shard(tmp_path):
    out, index = _sharded(tmp_path)
    index["weight_map"]["ghost"] = index["weight_map"]["a"]
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(wl.CorruptCheckpointError, match="ghost"):
        wl.open_checkpoint(out)


def test_unsupported_formats(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(wl.UnsupportedFormatError, match="notes.txt"):
        wl.open_checkpoint(tmp_path / "notes.txt")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")  # GGUF files are read (test_gguf_export.py); this one is cut short
    with pytest.raises((wl.CorruptCheckpointError, wl.MissingDependencyError), match="GGUF|gguf"):
        wl.open_checkpoint(tmp_path / "m.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(wl.UnsupportedFormatError, match="not a Hugging Face"):
        wl.open_checkpoint(tmp_path / "empty")
    with pytest.raises(wl.CheckpointError, match="no such file"):
        wl.open_checkpoint(tmp_path / "missing")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(wl.UnsupportedFormatError, match="state dict"):
        wl.open_checkpoint(tmp_path / "list.pt")


def test_refuses_existing_output_unless_force(tmp_path):
    wl.save_state_dict({"a": torch.zeros(1)}, tmp_path / "m")
    with pytest.raises(wl.OutputExistsError, match="--force"):
        wl.save_state_dict({"a": torch.ones(1)}, tmp_path / "m")
    assert torch.equal(wl.open_checkpoint(tmp_path / "m").get("a"), torch.zeros(1))
    wl.save_state_dict({"a": torch.ones(1)}, tmp_path / "m", force=True)
    assert torch.equal(wl.open_checkpoint(tmp_path / "m").get("a"), torch.ones(1))
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp or old folders left behind


def test_refuses_to_write_into_or_over_inputs(tmp_path):
    inp = wl.save_state_dict({"a": torch.zeros(1)}, tmp_path / "in")
    for bad in (inp, inp / "sub", tmp_path):
        with pytest.raises(wl.OutputExistsError, match="input"):
            CheckpointWriter(bad, inputs=[inp], force=True)
    assert torch.equal(wl.open_checkpoint(inp).get("a"), torch.zeros(1))


def test_exception_while_writing_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with CheckpointWriter(tmp_path / "m") as w:
            w.add("a", torch.zeros(10))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_killed_writer_leaves_no_final_folder(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, torch
        from weightlab.io import CheckpointWriter
        w = CheckpointWriter({str(tmp_path / 'm')!r}, max_shard_size=1000)
        for i in range(20):
            w.add(f"t{{i}}", torch.randn(100))
            if i == 12:
                os.kill(os.getpid(), signal.SIGKILL)
        w.close()
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "m").exists()
    leftovers = list(tmp_path.glob(".m.weightlab-tmp-*"))
    assert len(leftovers) == 1  # the dead writer's hidden temp folder...
    wl.save_state_dict({"a": torch.zeros(1)}, tmp_path / "m")  # ...is cleaned by the next writer
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def _raw_safetensors(path, header: bytes, data: bytes = b""):
    import struct

    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


@pytest.mark.parametrize("header,data,needle", [
    (b'{"a":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,4]}}', b"\0" * 4, "not valid JSON"),
    (b'{"a":' + b"[" * 50000 + b"]" * 50000 + b"}", b"", "not valid JSON"),
    (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
     b"\0" * 4, "names a tensor twice"),
    (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', b"\0" * 8, "unused bytes before"),
    (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 12, "trailing bytes"),
    (b'{"\\ud800":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4, "lone surrogate"),
    (b'{"a\\u0000b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4, "NUL character"),
    (b'{"a":{"dtype":"F32","shape":[0,99999999999999999999],"data_offsets":[0,0]}}', b"", "implausibly large"),
])
def test_hostile_headers_get_typed_errors(tmp_path, header, data, needle):
    """What the safetensors library refuses (duplicates, gaps, trailing bytes) or Python chokes on (huge ints,
    deep nesting) is one CorruptCheckpointError naming the file, before any tensor is read."""
    from weightlab.errors import CorruptCheckpointError
    from weightlab.io.reader import open_checkpoint

    p = _raw_safetensors(tmp_path / "x.safetensors", header, data)
    with pytest.raises(CorruptCheckpointError, match=needle) as e:
        open_checkpoint(p)
    assert "x.safetensors" in str(e.value)


def test_huge_integers_in_config_json_are_a_typed_error(tmp_path):
    import torch
    from safetensors.torch import save_file

    from weightlab.errors import CorruptCheckpointError
    from weightlab.io.reader import open_checkpoint

    save_file({"w": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text('{"hidden_size": ' + "9" * 5000 + "}")
    with pytest.raises(CorruptCheckpointError, match="config.json"):
        open_checkpoint(tmp_path).config


def test_a_fifo_named_safetensors_is_refused_not_read(tmp_path):
    import os

    from weightlab.cli import main

    os.mkfifo(tmp_path / "model.safetensors")  # opening it for reading would block forever
    assert main(["info", str(tmp_path / "model.safetensors")]) == 1
    assert main(["info", str(tmp_path)]) == 1


def test_force_replacement_is_atomic_and_a_kill_between_renames_is_repaired(tmp_path):
    import os

    from weightlab.io.atomic import AtomicFolder, _exchange

    out = tmp_path / "out"
    out.mkdir()
    (out / "v").write_text("1")
    with AtomicFolder(out, force=True) as tmp:
        (tmp / "v").write_text("2")
    assert (out / "v").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # nothing left beside it
    # the fallback path killed between its two renames: NAME missing, the old folder parked under a dead PID
    dead = 2 ** 22 + 12345
    while True:
        try:
            os.kill(dead, 0)
            dead += 1
        except ProcessLookupError:
            break
    parked = tmp_path / f".out.weightlab-old-{dead}-abcd1234"
    os.rename(out, parked)
    with AtomicFolder(tmp_path / "other") as tmp:  # any writer beside it repairs only its own name
        pass
    assert not out.exists()
    with AtomicFolder(out, force=True) as tmp:  # the next writer of NAME puts the old output back first
        assert (out / "v").read_text() == "2"
        (tmp / "v").write_text("3")
    assert (out / "v").read_text() == "3" and not parked.exists()
    assert _exchange(tmp_path / "out", tmp_path / "other") in (True, False)


def test_sigterm_removes_the_temporary_folder(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    code = ("import time, sys\nfrom weightlab.cli import _terminate_as_interrupt\nfrom weightlab.io.atomic import "
            "AtomicFolder\n_terminate_as_interrupt()\ntry:\n    with AtomicFolder(sys.argv[1]) as tmp:\n"
            "        print('ready', flush=True)\n        time.sleep(60)\nexcept KeyboardInterrupt:\n    sys.exit(130)\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "out")], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    assert any(x.name.startswith(".out.weightlab-tmp-") for x in tmp_path.iterdir())
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=30) == 130
    time.sleep(0.1)
    assert list(tmp_path.iterdir()) == []


def test_single_file_outputs_never_overwrite_inputs_and_need_force(tmp_path):
    import torch
    from safetensors.torch import save_file

    from weightlab.cli import main

    m = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(8, 8)}, str(m))
    before = m.read_bytes()
    # the input itself as --json / --report: refused even with --force, and the input is untouched
    assert main(["inspect", str(m), "--json", str(m), "--force"]) == 1
    assert main(["inspect", str(m), "--report", str(m), "--force"]) == 1
    assert m.read_bytes() == before
    out = tmp_path / "r.json"
    out.write_text("keep me")
    assert main(["inspect", str(m), "--json", str(out)]) == 1 and out.read_text() == "keep me"
    assert main(["inspect", str(m), "--json", str(out), "--force"]) == 0 and out.read_text() != "keep me"


def test_adapter_export_never_replaces_its_input(tmp_path):
    import torch

    from weightlab import adapt
    from weightlab.cli import main

    net = torch.nn.Sequential(torch.nn.Linear(8, 8))
    adapt.attach(net, "lora", r=2)
    adapt.save(net, tmp_path / "ad")
    before = sorted(p.name for p in (tmp_path / "ad").iterdir())
    assert main(["adapter", "export", str(tmp_path / "ad"), "-o", str(tmp_path / "ad"), "--force"]) == 1
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == before
