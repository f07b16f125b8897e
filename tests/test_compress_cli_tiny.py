"""prune / quantize / compensate from the command line on a tiny Llama: sequential by default, the same
result as --whole-model, placement errors before any work."""
import json

import pytest
import torch

from weightlab.cli import main
from weightlab.io.reader import open_checkpoint

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from weightlab.io.refs import load_text

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([load_text("wiki", "calib")[:200_000]],
                            trainers.BpeTrainer(vocab_size=256, special_tokens=["<unk>", "<s>"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="<s>")
    cfg = transformers.LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "llama"
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(path)
    fast.save_pretrained(path)
    return str(path)


COMMON = ["--nsamples", "4", "--seqlen", "64", "--eval-tokens", "1024", "--device", "cpu"]


def _same(a, b):
    with open_checkpoint(a) as x, open_checkpoint(b) as y:
        assert set(x.names()) == set(y.names())
        for n in x.names():
            assert torch.equal(x.get(n), y.get(n)), n


def test_prune_sequential_default_equals_whole_model(tiny, tmp_path, one_thread):
    assert main(["prune", tiny, "-m", "sparsegpt", "--pattern", "2:4", *COMMON, "-o", str(tmp_path / "seq")]) == 0
    assert main(["prune", tiny, "-m", "sparsegpt", "--pattern", "2:4", *COMMON, "--whole-model",
                 "-o", str(tmp_path / "whole")]) == 0
    _same(tmp_path / "seq", tmp_path / "whole")
    a = json.loads((tmp_path / "seq" / "prune-report.json").read_text())
    b = json.loads((tmp_path / "whole" / "prune-report.json").read_text())
    assert a["sequential"] and not b["sequential"]
    # the streamed evaluation scores the same windows as the whole-model one
    assert a["before"]["tokens"] == b["before"]["tokens"]
    assert a["before"]["perplexity"] == pytest.approx(b["before"]["perplexity"], rel=1e-5)
    assert a["after"]["perplexity"] == pytest.approx(b["after"]["perplexity"], rel=1e-5)
    assert a["memory_estimate"]["host_bytes"] > 0


def test_quantize_then_compensate_sequential(tiny, tmp_path, one_thread):
    q = tmp_path / "q"
    assert main(["quantize", tiny, "-m", "gptq", "-b", "3", "-g", "32", "--format", "hf", *COMMON, "-o", str(q)]) == 0
    rep = json.loads((q / "quantize-report.json").read_text())
    assert rep["sequential"] and rep["after"]["perplexity"] > 0
    assert main(["compensate", str(q), "--original", tiny, "-r", "4", *COMMON, "-o", str(tmp_path / "c")]) == 0
    comp = json.loads((tmp_path / "c" / "compensate-report.json").read_text())
    assert comp["input_weighted_error_ratio"] < 1


def test_compressed_tensors_written_block_by_block_equals_whole_model(tiny, tmp_path, one_thread):
    """The default quantize output (compressed-tensors) from sequential onloading is the whole-model one."""
    args = ["quantize", tiny, "-m", "gptq", "-b", "4", "-g", "32", *COMMON, "--no-eval"]
    assert main([*args, "-o", str(tmp_path / "seq")]) == 0
    assert main([*args, "--whole-model", "-o", str(tmp_path / "whole")]) == 0
    _same(tmp_path / "seq", tmp_path / "whole")
    a = json.loads((tmp_path / "seq" / "config.json").read_text())["quantization_config"]
    b = json.loads((tmp_path / "whole" / "config.json").read_text())["quantization_config"]
    assert a == b and a["ignore"] == ["lm_head"]
    m = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "seq")
    assert torch.isfinite(m(input_ids=torch.arange(8)[None]).logits).all()


def test_placement_errors_before_any_work(tiny, tmp_path, capsys, monkeypatch):
    if not torch.cuda.is_available():
        assert main(["prune", tiny, "--device", "cuda", "-o", str(tmp_path / "x")]) == 1
        assert "no CUDA device" in capsys.readouterr().err
    assert main(["quantize", tiny, "-g", "32", "--max-memory", "50KB", "--device", "cpu",
                 "-o", str(tmp_path / "x")]) == 1
    assert "more than --max-memory" in capsys.readouterr().err
    assert main(["prune", tiny, "-m", "gblm", "--sequential", "--device", "cpu", "-o", str(tmp_path / "x")]) == 1
    assert "whole model" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun the in-memory path would compute and write on every rank
    assert main(["prune", tiny, "--whole-model", "--device", "cpu", "-o", str(tmp_path / "x")]) == 1
    assert "runs in one process" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("args,needle", [
    (["prune", "-m", "wanda", "--pattern", "2:4", "--sparsity", "0.7"], "would be ignored"),
    (["prune", "-m", "wanda", "--pattern", "2-4"], "pattern must look like"),
    (["prune", "-m", "rtn"], "not a pruning rule"),
    (["prune", "-m", "wanda", "--sparsity", "1.5"], "sparsity must be in"),
    (["prune", "-m", "wanda", "--allocation", "wanda"], "not an allocation"),
    (["prune", "-m", "wanda", "-p", "alpha=3"], "invalid parameters"),
    (["quantize", "-m", "gptq", "-b", "9", "--format", "hf"], "bits must be"),
    (["quantize", "-m", "wanda"], "not a quantizer"),
    (["quantize", "-m", "rtn", "-g", "0", "--format", "hf"], "group size"),
])
def test_options_are_checked_before_the_model_is_read(args, needle, tmp_path, capsys):
    # the model path does not even exist: the option error must come first (no load, no "before" evaluation)
    assert main([args[0], str(tmp_path / "no-model"), *args[1:], "-o", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert needle in err and "no such file" not in err


def test_a_pattern_sets_the_sparsity(tiny, tmp_path):
    assert main(["prune", tiny, "-m", "magnitude", "--pattern", "1:4", *COMMON, "--no-eval",
                 "-o", str(tmp_path / "p")]) == 0
    rep = json.loads((tmp_path / "p" / "prune-report.json").read_text())
    assert rep["target_sparsity"] == 0.25 and abs(rep["achieved_sparsity"] - 0.25) < 1e-6


def test_nan_in_the_input_is_refused_before_any_work(tiny, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(tiny, bad)
    sd = load_file(str(bad / "model.safetensors"))
    sd["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    for cmd in (["prune", str(bad), "-m", "magnitude"], ["quantize", str(bad), "-m", "rtn", "--format", "hf"]):
        assert main([*cmd, "--no-eval", "-o", str(tmp_path / "o")]) == 1
        assert "model.layers.1.mlp.up_proj.weight" in capsys.readouterr().err
        assert not (tmp_path / "o").exists()
