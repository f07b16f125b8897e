"""Two processes (gloo) calibrate like one: statistics summed over ranks, rank 0 writes (scale.md T3)."""
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from weightlab.compress.sequential import run_sequential
from weightlab.engine.distributed import DistContext, shard_bounds, shard_of
from weightlab.errors import ConfigError
from weightlab.io.reader import open_checkpoint

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _llama(path):
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(path)
    return str(path)


def _ids(n):
    return torch.randint(0, 128, (n, 16), generator=torch.Generator().manual_seed(1))


def _worker(rank, world, port, src, out, verb, kw, n):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        run_sequential(verb, src, out, calib=_ids(n), show_progress=False, **kw)
    finally:
        dist.destroy_process_group()


def _spawn(world, src, out, verb, kw, n):
    mp.spawn(_worker, args=(world, _free_port(), src, out, verb, kw, n), nprocs=world, join=True)


def _tensors(folder):
    with open_checkpoint(folder) as ck:
        return {k: ck.get(k).clone() for k in ck.names()}


@pytest.mark.parametrize("verb,kw,n", [
    ("quantize", {"method": "gptq", "bits": 4, "group_size": 32, "hessian": True}, 12),  # 3 batches: N % R != 0
    ("prune", {"method": "wanda", "sparsity": 0.5, "hessian": False}, 4),  # 1 batch: rank 1 has no sample
    ("prune", {"method": "sparsegpt", "sparsity": 0.5, "hessian": True}, 8),
])
def test_two_processes_equal_one_with_two_shards(tmp_path, verb, kw, n):
    torch.set_num_threads(1)
    src = _llama(tmp_path / "src")
    _spawn(2, src, str(tmp_path / "dist"), verb, kw, n)
    run_sequential(verb, src, tmp_path / "one", calib=_ids(n), shards=2, **kw)  # partial sums added in rank order
    run_sequential(verb, src, tmp_path / "plain", calib=_ids(n), **kw)
    a, b, c = _tensors(tmp_path / "dist"), _tensors(tmp_path / "one"), _tensors(tmp_path / "plain")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit-exact: a 2-rank SUM all-reduce is a + b
        assert torch.allclose(a[k], c[k], atol=1e-2 if verb == "quantize" else 1e-5), k  # summation order only


def _digest_worker(rank, world, port, q):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        names = [("a.q_proj", 64), ("a.k_proj", 64)]
        DistContext(rank, world).check_same(names if rank == 0 else names[::-1], "layer statistics")
        q.put("no error")
    except ConfigError as e:
        q.put(str(e))
    finally:
        dist.destroy_process_group()


def test_ranks_reducing_different_module_orders_refuse():
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_digest_worker, args=(r, 2, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    msgs = [q.get(timeout=5) for _ in procs]
    assert all("ranks disagree" in m for m in msgs), msgs


def test_shards_are_contiguous_and_cover_everything():
    assert [shard_bounds(7, 3, r) for r in range(3)] == [(0, 3), (3, 5), (5, 7)]
    assert shard_of(5, 2) == [0, 0, 0, 1, 1]
    assert shard_bounds(1, 2, 1) == (1, 1)  # a rank with no sample still joins the collectives
