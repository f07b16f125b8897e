"""Tiny Llama models with planted structure for the neuron and head tests (nothing from a hub)."""
import torch

transformers = __import__("transformers")

WORDS = ("the a cat dog sat ran on under mat log red blue big small and then it was one two three four five "
         "six seven eight house tree river stone water fire").split()
HD = 8  # head dim of the tiny config


def word_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<bos>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", unk_token="<unk>",
                                                eos_token="<bos>", pad_token="<bos>")


def tiny_llama(vocab: int, seed: int = 0, layers: int = 2, head_std: float = 0.02):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=HD,
                                   max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=0,
                                   eos_token_id=0, pad_token_id=0)
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        m.lm_head.weight.normal_(0, head_std)
    return m


@torch.no_grad()
def plant_sink(m):
    """Layer 0: head 0 puts all attention on the BOS token (and its value there is 0); head 2 has zero
    queries, so it attends uniformly. BOS alone carries hidden dim 0; every other token a constant dim 1.

    RoPE leaves position 0 unrotated and turns the slowest pair (index HD/2-1) by under 0.05 rad over
    64 positions, so the planted query-key product stays large and positive at every query."""
    e = m.model.embed_tokens.weight
    e[:, 0] = 0
    e[:, 1] = 0.1
    e[0] = 0
    e[0, 0], e[0, 1] = 1.0, 0.1
    a = m.model.layers[0].self_attn
    slow = HD // 2 - 1
    a.k_proj.weight[:HD] = 0
    a.k_proj.weight[slow, 0] = 3.0  # kv head 0 keys: large only at BOS
    a.q_proj.weight[:HD] = 0
    a.q_proj.weight[slow, 1] = 3.0  # head 0 queries: large at every token
    a.v_proj.weight[:HD, :2] = 0  # kv head 0 reads nothing from BOS: v_0 = 0
    a.q_proj.weight[2 * HD:3 * HD] = 0  # head 2: all scores equal
    a.v_proj.weight[HD:2 * HD] *= 20  # make head 2 matter for the loss
    a.o_proj.weight[:, 2 * HD:3 * HD] *= 20
    return m
