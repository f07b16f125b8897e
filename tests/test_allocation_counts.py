"""An allocation's per-layer counts survive the rules' floor(sparsity * numel)."""
import torch

from weightlab.compress.allocation import global_magnitude, lamp
from weightlab.tensor.pruning import count_fraction, layer_mask


def test_plain_ratio_loses_a_weight_and_count_fraction_does_not():
    assert int(15 / 22 * 22) == 14  # the float trap the helper exists for
    for n in range(1, 300):
        for c in range(n + 1):
            f = count_fraction(c, n)
            assert int(f * n) == c and 0.0 <= f <= 1.0


def test_global_allocation_prunes_exactly_the_counted_weights():
    a = torch.arange(1.0, 23.0).reshape(2, 11)  # 22 weights, all below every weight of b
    b = torch.full((2, 5), 100.0)
    for rule in (global_magnitude, lamp):
        alloc = rule({"a": a, "b": b}, 15 / 32)
        pruned = {n: int((~layer_mask(w.abs(), alloc[n])).sum()) for n, w in (("a", a), ("b", b))}
        assert sum(pruned.values()) == 15, (rule.__name__, alloc, pruned)
    alloc = global_magnitude({"a": a, "b": b}, 15 / 32)
    assert int((~layer_mask(a.abs(), alloc["a"])).sum()) == 15
