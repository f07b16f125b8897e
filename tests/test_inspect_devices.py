"""inspect on a device and across processes: the float64 torch route equals numpy, the layers split over
torch.distributed ranks give exactly the one-process result, and --device cuda without CUDA is one line."""
import json
import socket

import numpy as np
import pytest
import torch

from weightlab.inspect.analysis import analyze, share
from weightlab.tensor import spectral as S

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                   reason="no CUDA device"))]


def _model(seed: int = 0, delta: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {f"model.layers.{i}.mlp.weight": torch.randn(48 + 8 * i, 32, generator=g) for i in range(5)}
    sd["model.embed.weight"] = torch.randn(20, 96, generator=g)  # wide: the x x^T side
    sd["model.conv.weight"] = torch.randn(16, 8, 3, 3, generator=g)
    sd["model.norm.weight"] = torch.ones(32)
    if delta:
        sd = {k: v.clone() for k, v in sd.items()}
        sd["model.layers.2.mlp.weight"] += 0.1 * torch.randn(64, 2, generator=g) @ torch.randn(2, 32, generator=g)
        sd["model.norm.weight"] += 0.5
    return sd


def _table(res) -> str:
    return json.dumps({"layers": list(res), "diff": res.diff}, sort_keys=True, default=str)


def test_torch_gram_route_equals_numpy():
    rng = np.random.default_rng(0)
    cpu = torch.device("cpu")
    for shape in ((70, 12), (12, 70)):
        x = rng.standard_normal(shape).astype(np.float32)
        x.setflags(write=False)  # a memory-mapped tensor is read-only
        x0 = rng.standard_normal(shape).astype(np.float32)
        np.testing.assert_allclose(S.gram_on(x, cpu).numpy(), S.gram(x), rtol=1e-13, atol=1e-12)
        np.testing.assert_allclose(S.gram_on(x, cpu, x0).numpy(), S.gram_of_difference(x, x0), rtol=1e-13,
                                   atol=1e-12)
        np.testing.assert_allclose(S.eigvalsh(S.gram_on(x, cpu)), S.eigvalsh(S.gram(x)), rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_analyze_on_device_matches_numpy_reference(device):
    ref = analyze(_model(), base=_model(delta=True), show_progress=False, threads=2)
    got = analyze(_model(), base=_model(delta=True), show_progress=False, threads=2, device=device)
    assert [r["name"] for r in got] == [r["name"] for r in ref]
    for a, b in zip(ref, got):
        for key in ("frobenius_norm", "spectral_norm", "stable_rank", "lambda_max", "alpha"):
            if a.get(key) is None:
                assert b.get(key) is None
            else:
                assert b[key] == pytest.approx(a[key], rel=1e-9), (a["name"], key)
        assert a["numerical_rank"] == b["numerical_rank"]
    for a, b in zip(ref.diff, got.diff):
        assert a["status"] == b["status"] and a.get("intruders") == b.get("intruders")
        if a.get("delta_spectral_norm") is not None:
            assert b["delta_spectral_norm"] == pytest.approx(a["delta_spectral_norm"], rel=1e-9)


def test_share_balances_by_cost_and_covers_every_job():
    costs = [100.0, 60.0, 50.0, 40.0, 10.0, 10.0]
    owner = share(costs, 2)
    load = [sum(c for c, r in zip(costs, owner) if r == k) for k in range(2)]
    assert sorted(load) == [130.0, 140.0]  # LPT: {100, 40} / {60, 50, 10, 10} plus ties
    assert share(costs, 1) == [0] * len(costs)
    assert sorted(set(share(costs, 4))) == [0, 1, 2, 3]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    import weightlab.inspect.analysis as A

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    done = []
    work = A._work

    def counted(it, *args):  # which matrices this rank analysed itself
        done.append(it.name)
        return work(it, *args)

    A._work = counted
    try:
        torch.set_num_threads(1)
        res = analyze(_model(), base=_model(delta=True), show_progress=False, threads=1)
        with open(f"{out}/rank{rank}.json", "w") as f:
            f.write(_table(res))
        with open(f"{out}/rank{rank}.meta", "w") as f:
            json.dump({"processes": res.summary.get("processes"), "done": sorted(done)}, f)
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process_exactly(tmp_path):
    import torch.multiprocessing as mp

    one = analyze(_model(), base=_model(delta=True), show_progress=False, threads=1)
    mp.spawn(_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    meta = [json.loads((tmp_path / f"rank{r}.meta").read_text()) for r in range(2)]
    for r in range(2):
        assert (tmp_path / f"rank{r}.json").read_text() == _table(one)
        assert meta[r]["processes"] == 2 and meta[r]["done"]
    # a real split: every analysed matrix on exactly one rank
    assert sorted(meta[0]["done"] + meta[1]["done"]) == sorted(r["name"] for r in one if "tied_to" not in r)
    assert not set(meta[0]["done"]) & set(meta[1]["done"])


def test_distributed_true_without_a_group_is_a_clear_error():
    from weightlab.errors import ConfigError

    with pytest.raises(ConfigError, match="torch.distributed"):
        analyze(_model(), distributed=True, show_progress=False)
