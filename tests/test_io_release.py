"""Releasing a tensor's pages of a memory-mapped safetensors file: whole pages only, merged with
released neighbours (the kernel's fault-around re-maps their pages), never a live tensor's page."""
import mmap

import torch
from safetensors.torch import save_file

from weightlab.io.tensor_files import FAULT_AROUND, _SafetensorsFile

P = mmap.PAGESIZE


class _Recorder:
    """Stands in for the mmap once the file is open: records (start, end) of every MADV_DONTNEED."""

    def __init__(self, mm):
        self.mm, self.calls = mm, []

    def __len__(self):
        return len(self.mm)

    def __getitem__(self, k):
        return self.mm[k]

    def madvise(self, advice, start, length):
        assert advice == mmap.MADV_DONTNEED and start % P == 0
        self.calls.append((start, start + length))


def _open(tmp_path, sizes):
    # uint8 tensors, so the byte ranges are the sizes; names sort in file order
    save_file({f"t{i}": torch.zeros(n, dtype=torch.uint8) for i, n in enumerate(sizes)}, tmp_path / "m.safetensors")
    f = _SafetensorsFile(tmp_path / "m.safetensors")
    f.get("t0")
    rec = f._mm = _Recorder(f._mm)
    d = f.header.data_start
    ranges = {n: (d + e.begin, d + e.end) for n, e in f.header.entries.items()}
    return f, rec, ranges


def _up(x):
    return -(-x // P) * P


def _down(x):
    return x // P * P


def test_a_lone_release_keeps_the_pages_it_shares_with_live_neighbours(tmp_path):
    f, rec, r = _open(tmp_path, [3 * P + 100, 5 * P, 3 * P])
    f.release("t1")
    assert rec.calls == [(_up(r["t1"][0]), _down(r["t1"][1]))]


def test_released_neighbours_are_dropped_together_with_their_shared_pages(tmp_path):
    f, rec, r = _open(tmp_path, [3 * P + 100, 5 * P, 3 * P])
    f.release("t1")
    f.release("t0")  # first tensor: rounds down to the page holding the header's tail; t2 is live
    assert rec.calls[-1] == (_down(r["t0"][0]), _down(r["t1"][1]))
    f.release("t2")  # all released: t0..t2, the last page rounded up
    assert rec.calls[-1] == (_down(r["t0"][0]), min(_up(r["t2"][1]), len(rec)))


def test_a_tensor_read_again_is_live_and_its_pages_are_kept(tmp_path):
    f, rec, r = _open(tmp_path, [3 * P + 100, 5 * P, 3 * P])
    f.release("t1")
    f._mm = rec.mm  # read through the real map (the recorder has no buffer protocol)
    f.get("t1")
    f._mm = rec
    f.release("t0")
    assert rec.calls[-1] == (_down(r["t0"][0]), _down(r["t0"][1]))  # stops at t1, which is in use again


def test_the_merge_reaches_only_as_far_as_fault_around(tmp_path):
    # t1 is 64 KiB + 2 pages: releasing t2 drops t1's last 64 KiB (where fault-around can have re-mapped
    # pages) and stops there; t3 is live, so t2's page shared with it stays
    f, rec, r = _open(tmp_path, [2 * P, FAULT_AROUND + 2 * P, P + 10, 2 * P])
    f.release("t0")
    f.release("t1")
    f.release("t2")
    assert rec.calls[-1] == (_down(r["t2"][0] - FAULT_AROUND), _down(r["t2"][1]))
    f.release("t3")  # the same reach past the end of t3 (the file ends sooner)
    assert rec.calls[-1] == (_down(r["t3"][0] - FAULT_AROUND), len(rec))
