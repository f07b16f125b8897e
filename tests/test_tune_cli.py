"""`weightlab tune` end to end on a tiny Llama with its own tokenizer: text, prompt/response pairs, resume, export."""
import json
import math
import random

import pytest
import torch

from weightlab import adapt
from weightlab.adapt.api import adapter_state
from weightlab.cli import main
from weightlab.adapt.training import PairData, load_data, tune
from weightlab.io.hf import load_causal_lm

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
WORDS = ("the cat dog sat ran on under a mat log red blue big small quickly slowly and then it was seen by "
         "one two three four five").split()


pytestmark = pytest.mark.usefixtures("one_thread_module")  # tiny tensors: one thread (conftest.py)


def sentences(n, seed):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny Llama folder with a byte-level BPE tokenizer trained here (nothing from a hub)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("tiny")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(sentences(300, 0), trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=fast.vocab_size, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=128, eos_token_id=0, bos_token_id=0, pad_token_id=0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(d / "model"))
    fast.save_pretrained(str(d / "model"))
    (d / "text.txt").write_text("\n".join(sentences(400, 1)))
    rows = [{"prompt": f"say {s}", "response": s.upper()} for s in sentences(40, 2)]
    (d / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return d


def history(out):
    return json.loads((out / "history.json").read_text())


def test_tune_text_heldout_and_merged_export(base, tmp_path, capsys):
    out = tmp_path / "t"
    args = ["tune", str(base / "model"), "--data", str(base / "text.txt"), "--steps", "4", "--seqlen", "16",
            "--batch-size", "2", "--rank", "4", "--lr", "1e-2", "--eval-every", "2", "-o", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "held-out loss" in text and "tuned" in text
    h = history(out)
    assert [e["step"] for e in h["history"]] == [0, 2, 4] and all(math.isfinite(e["heldout"]) for e in h["history"])
    assert "train" in h["history"][-1] and h["heldout_after"] < h["heldout_before"]
    # the merged folder is a plain model whose forward equals the base with the adapter attached
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(out / "merged")).eval()
    assert not any("adapter" in n for n, _ in merged.named_modules())
    ref, tok = load_causal_lm(base / "model")
    adapt.load(ref, out / "adapter")
    x = tok("the cat sat on a mat and then it ran.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(merged(x).logits, ref(x).logits, atol=1e-5)
        assert not torch.allclose(merged(x).logits, load_causal_lm(base / "model")[0](x).logits, atol=1e-3)
    assert main(args) == 1 and "--force" in capsys.readouterr().err


def test_tune_prompt_response_loss_only_on_responses(base, tmp_path):
    model, tok = load_causal_lm(base / "model")
    tr, ho = load_data(str(base / "pairs.jsonl"), tok, 64)
    assert isinstance(tr, PairData) and len(tr.ex) == 36 and len(ho.ex) == 4
    b = tr.batch(3, torch.Generator().manual_seed(0))
    for k in range(3):
        p, r = tr.ex[tr.offsets.index(int(b["sample_ids"][k, 0]))]
        assert (b["labels"][k, :len(p)] == -100).all()
        assert b["labels"][k, len(p):len(p) + len(r)].tolist() == r and r[-1] == tok.eos_token_id
    # held-out loss before training: transformers' loss on the held-out pairs' response tokens only
    tot = cnt = 0
    with torch.no_grad():
        for p, r in ho.ex:
            x = torch.tensor([p + r])
            lg = model(x).logits[0, len(p) - 1:-1]
            tot += float(torch.nn.functional.cross_entropy(lg, torch.tensor(r), reduction="sum"))
            cnt += len(r)
    out = tmp_path / "p"
    assert main(["tune", str(base / "model"), "--data", str(base / "pairs.jsonl"), "--adapter", "sorsa", "--steps",
                 "3", "--seqlen", "64", "--batch-size", "2", "--rank", "4", "--reweight", "linupper", "--reweight-param",
                 "burn_in=0", "--reweight-param", "temperature=0.5", "--no-merged", "-o", str(out)]) == 0
    h = history(out)
    assert math.isclose(h["heldout_before"], tot / cnt, rel_tol=1e-5)
    assert h["loss_weighting"] == {"name": "loss-reweight", "params": {"strategy": "linupper", "temperature": 0.5,
                                                                        "burn_in": 0}}
    assert (out / "adapter" / "adapter_config.json").is_file() and not (out / "merged").exists()


class Stop(Exception):
    pass


def test_tune_resume_gives_the_uninterrupted_result(base, tmp_path):
    common = ["--data", str(base / "text.txt"), "--steps", "6", "--seqlen", "16", "--batch-size", "2", "--rank",
              "4", "--lr", "1e-2", "--eval-every", "2", "--save-every", "3", "--no-merged"]
    assert main(["tune", str(base / "model"), *common, "-o", str(tmp_path / "a")]) == 0

    def stop_at_4(step, loss):  # a crash after the step-3 checkpoint
        if step == 4:
            raise Stop

    model, tok = load_causal_lm(base / "model")
    with pytest.raises(Stop):
        tune(model, tok, "lora", str(base / "text.txt"), rank=4, steps=6, lr=1e-2, batch_size=2, seqlen=16,
             eval_every=2, save_every=3, merged=False, out=tmp_path / "b", on_eval=stop_at_4, progress=False)
    assert main(["tune", str(base / "model"), *common, "-o", str(tmp_path / "b")]) == 0
    ha, hb = history(tmp_path / "a"), history(tmp_path / "b")
    assert hb["resumed_from"] == 3 and ha["resumed_from"] == 0
    assert [e["heldout"] for e in hb["history"]] == pytest.approx([e["heldout"] for e in ha["history"]], rel=1e-6)
    a, b = load_causal_lm(base / "model")[0], load_causal_lm(base / "model")[0]
    sa, sb = adapter_state(adapt.load(a, tmp_path / "a" / "adapter")), adapter_state(adapt.load(b, tmp_path / "b" /
                                                                                                  "adapter"))
    assert all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)


def test_tune_cli_errors(base, tmp_path, capsys):
    common = ["tune", str(base / "model"), "--data", str(base / "text.txt"), "--steps", "1", "--seqlen", "16"]
    assert main([*common, "--reweight", "el2n", "-o", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "does not weight a training loss" in err and len(err.strip().splitlines()) == 1
    assert main([*common, "--reweight-param", "temperature=1", "-o", str(tmp_path / "y")]) == 1
    assert "--reweight NAME" in capsys.readouterr().err
    assert main([*common, "--reweight", "linupper", "--reweight-param", "temperature=-1", "-o", str(tmp_path / "z")]) == 1
    assert "temperature" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in "xyz")


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--adapter", "lora"], ["--adapter", "sorsa", "--reweight", "linupper", "--reweight-param",
                                                           "burn_in=0"]])
def test_two_processes_equal_one_process_with_the_global_batch(base, tmp_path, extra):
    import os
    import shutil
    import subprocess
    import sys

    pytest.importorskip("accelerate")
    # accelerate launch runs CPU processes only through mpirun; torchrun is the plain way on CPU
    launcher = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if launcher is None:
        pytest.skip("torchrun is not installed")
    common = ["--data", str(base / "text.txt"), "--steps", "4", "--seqlen", "16", "--rank", "4", "--lr", "1e-2",
              "--eval-every", "2", "--no-merged", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([launcher, "--nproc_per_node", "2", "-m", "weightlab", "tune",
                        str(base / "model"), *common, "--batch-size", "2", "-o", str(tmp_path / "two")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("tuned") == 1  # only the main process reports
    assert main(["tune", str(base / "model"), *common, "--batch-size", "4", "-o", str(tmp_path / "one")]) == 0
    h2, h1 = history(tmp_path / "two"), history(tmp_path / "one")
    assert h2["processes"] == 2 and h1["processes"] == 1
    assert [e["heldout"] for e in h2["history"]] == pytest.approx([e["heldout"] for e in h1["history"]], rel=1e-5)
    a, b = load_causal_lm(base / "model")[0], load_causal_lm(base / "model")[0]
    sa = adapter_state(adapt.load(a, tmp_path / "one" / "adapter"))
    sb = adapter_state(adapt.load(b, tmp_path / "two" / "adapter"))
    # gradients summed in another order; Adam's first steps amplify that noise in near-zero entries
    assert max(float((sa[k] - sb[k]).norm() / sa[k].norm()) for k in sa) < 1e-4
