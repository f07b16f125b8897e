"""Hypothesis fuzzing: the header parser and the reader raise only typed errors, never crash."""
import json
import struct

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import weightlab as wl
from weightlab.io.safetensors_format import parse_header

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(st.binary(max_size=300))
def test_parse_header_arbitrary_bytes(data):
    try:
        parse_header(data, len(data))
    except wl.CorruptCheckpointError:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)
entry = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "X9", 3]),
    "shape": st.lists(st.integers(-2, 6), max_size=3) | json_values,
    "data_offsets": st.lists(st.integers(-5, 400), min_size=0, max_size=3) | json_values,
})


@FUZZ
@given(st.dictionaries(st.text(max_size=10), entry | json_values, max_size=5), st.integers(0, 600))
def test_parse_header_structured(obj, data_len):
    raw = json.dumps(obj).encode()
    blob = struct.pack("<Q", len(raw)) + raw
    try:
        h = parse_header(blob, len(blob) + data_len)
    except wl.CorruptCheckpointError:
        return
    for e in h.entries.values():  # anything accepted is internally consistent
        assert 0 <= e.begin <= e.end <= data_len


@FUZZ
@given(st.data())
def test_mutated_real_file_reads_or_fails_typed(tmp_path, data):
    path = tmp_path / "m.safetensors"
    if not path.exists():
        save_file({"a": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(5).half()}, path)
    raw = bytearray(path.read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(raw[:cut]))
    try:
        ck = wl.open_checkpoint(bad)
        for n in ck.names():
            t = ck.get(n)
            assert tuple(t.shape) == ck.info(n).shape
    except wl.CheckpointError:
        pass
