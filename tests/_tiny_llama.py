"""A tiny random Llama with a tiny byte-level BPE tokenizer, saved as an HF folder (GGUF and reader tests)."""
import json

import torch

CHAT = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def tiny_tokenizer(folder, vocab_size=128):
    """A byte-level BPE with 3 special tokens, 120 byte symbols and 5 merges = 128 tokens."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    base = sorted(pre_tokenizers.ByteLevel.alphabet())[:vocab_size - 8]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = [(base[i], base[i + 1]) for i in range(5)]
    vocab = {t: i for i, t in enumerate(specials + base + [a + b for a, b in merges])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.add_special_tokens([AddedToken(s, special=True) for s in specials])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>", "chat_template": CHAT}))
    return vocab


def tiny_llama(folder, hidden=64, inter=128, tied=False, seed=0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=tied,
                      bos_token_id=1, eos_token_id=2)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # keep values in a range where fp16 stays exact enough and logits are not flat
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.05)
    model.save_pretrained(folder)
    tiny_tokenizer(folder)
    return model
