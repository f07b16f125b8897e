import pytest
import torch

from weightlab.align import permuted_copy, resolve_spec, weight_matching

transformers = pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("one_thread")


def _llama(kv=2, tie=False):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=kv, max_position_embeddings=64,
                                   tie_word_embeddings=tie)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _bert(cls=transformers.BertForSequenceClassification):
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=64, num_labels=3)
    torch.manual_seed(0)
    return cls(cfg).eval()


@pytest.mark.parametrize("kv,tie", [(2, False), (4, False), (1, True)])
def test_llama_permutation_keeps_logits(kv, tie):
    m = _llama(kv, tie)
    s = resolve_spec(m, "auto")
    assert s.sizes["residual"] == 32 and s.sizes["mlp.0"] == 48 and s.sizes["heads.1"] == kv
    p = permuted_copy(m, s, s.random(3))
    assert not torch.equal(p.model.layers[0].mlp.up_proj.weight, m.model.layers[0].mlp.up_proj.weight)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(p(input_ids=ids).logits, m(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_llama_planted_permutation_recovered():
    m = _llama()
    s = resolve_spec(m, "auto")
    planted = permuted_copy(m, s, s.random(5))
    back, _ = weight_matching(m, planted)
    for k, v in m.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


@pytest.mark.parametrize("cls", ["BertForSequenceClassification", "BertForMaskedLM"])
def test_bert_permutation_keeps_outputs(cls):
    m = _bert(getattr(transformers, cls))
    s = resolve_spec(m, "auto")
    p = permuted_copy(m, s, s.random(4))
    assert not torch.equal(p.state_dict()["bert.encoder.layer.0.intermediate.dense.weight"],
                           m.state_dict()["bert.encoder.layer.0.intermediate.dense.weight"])
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        torch.testing.assert_close(p(input_ids=ids, attention_mask=mask).logits,
                                   m(input_ids=ids, attention_mask=mask).logits, rtol=1e-4, atol=1e-5)


def test_bert_planted_permutation_recovered():
    m = _bert()
    s = resolve_spec(m, "auto")
    back, _ = weight_matching(m, permuted_copy(m, s, s.random(2)))
    for k, v in m.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
