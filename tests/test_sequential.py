"""Sequential onloading == the whole-model path, bit for bit on the CPU (shared/design/scale.md T1)."""
import hashlib

import pytest
import torch

from weightlab.compress import prune
from weightlab.compress.compensate import compensate
from weightlab.compress.quantize import quantize
from weightlab.compress.sequential import Placement, run_sequential
from weightlab.engine.calibration import find_blocks
from weightlab.errors import ConfigError
from weightlab.io.reader import open_checkpoint

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # the same kernels (and summation order) in both paths
    yield
    torch.set_num_threads(old)


def _llama(path, tied, dtype=torch.float32, layers=3):
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tied)
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(cfg).to(dtype).eval()
    m.save_pretrained(path, max_shard_size="40KB")  # a block straddles several shards
    return path


def _bert(path):
    cfg = transformers.BertConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(cfg).eval().save_pretrained(path, max_shard_size="40KB")
    return path


IDS = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))


def _digests(folder) -> dict:
    with open_checkpoint(folder) as ck:
        return {n: hashlib.sha256(ck.get(n).contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
                for n in ck.names()}


def _whole(path, task="causal-lm"):
    cls = transformers.AutoModelForCausalLM if task == "causal-lm" else transformers.AutoModel
    return cls.from_pretrained(path, dtype=torch.float32).eval()


def _assert_same_as_written(model, folder):
    sd = model.state_dict()
    with open_checkpoint(folder) as ck:
        for n in ck.names():
            key = n if n in sd else n.split(".", 1)[1]
            assert torch.equal(ck.get(n), sd[key].to(ck.info(n).dtype)), n


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("verb,kw", [
    ("prune", {"method": "wanda", "sparsity": 0.5}),
    ("prune", {"method": "sparsegpt", "sparsity": 0.5, "pattern": "2:4"}),
    ("quantize", {"method": "gptq", "bits": 4, "group_size": 32}),
    ("quantize", {"method": "rtn", "bits": 4, "group_size": 32}),
])
def test_sequential_equals_whole_model(tmp_path, tied, verb, kw):
    src = _llama(tmp_path / "src", tied)
    hessian = kw["method"] in ("sparsegpt", "gptq")
    got = {}  # the integer layers reach the writer hook block by block (never all held by the report)
    rep, info = run_sequential(verb, src, tmp_path / "out", calib=IDS, hessian=hessian,
                               on_block_written=lambda i, name, state, codes: (got.update(codes), state)[1], **kw)
    whole = _whole(src)
    fn = prune if verb == "prune" else quantize
    ref = fn(whole, calib=IDS, **kw)
    _assert_same_as_written(whole, tmp_path / "out")
    assert [r["name"] for r in rep.layers] == [r["name"] for r in ref.layers]
    if verb == "quantize":
        assert not rep.quantized and got.keys() == ref.quantized.keys()
        for n, q in ref.quantized.items():
            assert torch.equal(got[n].codes, q.codes) and torch.equal(got[n].scales, q.scales)
    assert info["sequential"] and info["memory_estimate"]["block"].startswith("model.layers.")
    # every tensor of the input is in the output, untouched ones bit-identical
    out, inp = _digests(tmp_path / "out"), _digests(src)
    assert set(out) == set(inp)
    assert out["model.embed_tokens.weight"] == inp["model.embed_tokens.weight"]


def test_sequential_eora_equals_whole_model(tmp_path):
    src = _llama(tmp_path / "src", tied=False)
    comp = tmp_path / "q"
    run_sequential("quantize", src, comp, calib=IDS, method="rtn", bits=3, group_size=32, hessian=False)
    rep, _ = run_sequential("compensate", comp, tmp_path / "out", original=src, calib=IDS, method="eora", rank=4)
    whole, orig = _whole(comp), _whole(src)
    ref = compensate(whole, orig, "eora", 4, calib=IDS)
    _assert_same_as_written(whole, tmp_path / "out")
    assert rep.as_dict()["input_weighted_error_ratio"] == ref.as_dict()["input_weighted_error_ratio"] < 1


def test_sequential_bert_encoder(tmp_path):
    src = _bert(tmp_path / "src")
    rep, _ = run_sequential("prune", src, tmp_path / "out", task="encoder", calib=IDS, method="wanda",
                            sparsity=0.5, hessian=False)
    whole = _whole(src, "encoder")
    prune(whole, "wanda", 0.5, calib=IDS)
    _assert_same_as_written(whole, tmp_path / "out")
    assert rep.sparsity > 0.49


def test_bf16_checkpoint_is_computed_in_fp32_and_written_back_in_bf16(tmp_path):
    src = _llama(tmp_path / "src", tied=True, dtype=torch.bfloat16)
    run_sequential("prune", src, tmp_path / "out", calib=IDS, method="wanda", sparsity=0.5, hessian=False)
    whole = _whole(src)
    prune(whole, "wanda", 0.5, calib=IDS)
    _assert_same_as_written(whole, tmp_path / "out")
    with open_checkpoint(tmp_path / "out") as ck:
        assert {ck.info(n).dtype for n in ck.names()} == {torch.bfloat16}


def test_blocks_are_meta_between_turns_and_no_hooks_are_left(tmp_path):
    from weightlab.engine.onload import OnloadedModel

    src = _llama(tmp_path / "src", tied=False)
    om = OnloadedModel(src)
    seen = []

    def after(i, name, block):
        assert not any(t.is_meta for t in block.parameters())
        others = [b for j, b in enumerate(om.blocks) if j != i]
        assert all(t.is_meta for b in others for t in b.parameters())  # one block resident at a time
        seen.append(i)

    prune(om, "wanda", 0.5, calib=IDS, after_block=after)
    assert seen == [0, 1, 2]
    assert all(t.is_meta for t in om.blocks.parameters())
    assert om.model.lm_head.weight.is_meta  # never loaded for calibration
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in om.model.modules())


def test_streamed_perplexity_equals_whole_model(tmp_path):
    from weightlab.engine.evaluate import perplexity, streamed_perplexity

    class Tok:  # the evaluation tokenizes text; give it ids directly
        def __call__(self, text, return_tensors=None, add_special_tokens=False):
            return {"input_ids": IDS.reshape(1, -1)}

    for tied in (False, True):
        src = _llama(tmp_path / f"src{tied}", tied)
        a = perplexity(_whole(src), Tok(), "x", seqlen=32, max_tokens=256)
        b = streamed_perplexity(src, Tok(), "x", seqlen=32, max_tokens=256)
        assert b["tokens"] == a["tokens"] and b["perplexity"] == pytest.approx(a["perplexity"], rel=1e-6)


def test_methods_that_need_the_whole_model_say_so(tmp_path):
    src = _llama(tmp_path / "src", tied=False)
    with pytest.raises(ConfigError, match="whole model"):
        run_sequential("prune", src, tmp_path / "out", calib=IDS, method="gblm", sparsity=0.5)
    with pytest.raises(ConfigError, match="whole model"):
        run_sequential("prune", src, tmp_path / "out", calib=IDS, method="magnitude", sparsity=0.5, allocation="rd")
    assert not (tmp_path / "out").exists()


def test_global_allocation_reads_weights_from_the_checkpoint(tmp_path):
    src = _llama(tmp_path / "src", tied=False)
    rep, _ = run_sequential("prune", src, tmp_path / "out", method="magnitude", sparsity=0.5, allocation="global",
                            hessian=False)
    whole = _whole(src)
    ref = prune(whole, "magnitude", 0.5, allocation="global")
    _assert_same_as_written(whole, tmp_path / "out")
    assert [r["zeros"] for r in rep.layers] == [r["zeros"] for r in ref.layers]


def test_memory_budget_is_checked_before_any_work(tmp_path):
    src = _llama(tmp_path / "src", tied=False)
    with pytest.raises(ConfigError, match=r"block model\.layers\.\d needs about .* more than --max-memory"):
        run_sequential("quantize", src, tmp_path / "out", calib=IDS, method="gptq", bits=4, group_size=32,
                       placement=Placement(max_memory="100KB"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="cannot parse"):
        run_sequential("prune", src, tmp_path / "out", calib=IDS, method="wanda",
                       placement=Placement(max_memory="lots"))


def test_missing_device_is_one_error_before_work(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    src = _llama(tmp_path / "src", tied=False)
    with pytest.raises(ConfigError, match="no CUDA device"):
        run_sequential("prune", src, tmp_path / "out", calib=IDS, method="wanda", placement=Placement(device="cuda"))
    assert not (tmp_path / "out").exists()


def test_find_blocks_on_meta_skeleton(tmp_path):
    from weightlab.engine.onload import OnloadedModel

    om = OnloadedModel(_llama(tmp_path / "src", tied=True))
    name, blocks = find_blocks(om.model)
    assert name == "model.layers" and len(blocks) == 3
    assert not om.model.model.embed_tokens.weight.is_meta


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "phi3", "gemma"])
def test_sequential_other_decoder_families(tmp_path, arch):
    """The engine finds the blocks and captures their inputs through each model's own forward (embedding
    scaling, rotary embedding, masks), so other decoder families onload the same way."""
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    cfg = {"mistral": lambda: transformers.MistralConfig(**common),
           "qwen2": lambda: transformers.Qwen2Config(**common),
           "phi3": lambda: transformers.Phi3Config(**common, pad_token_id=0),
           "gemma": lambda: transformers.GemmaConfig(**common, head_dim=16)}[arch]()
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).eval().save_pretrained(tmp_path / "src", max_shard_size="40KB")
    run_sequential("prune", tmp_path / "src", tmp_path / "out", calib=IDS, method="sparsegpt", sparsity=0.5)
    whole = _whole(tmp_path / "src")
    prune(whole, "sparsegpt", 0.5, calib=IDS)
    _assert_same_as_written(whole, tmp_path / "out")
