"""Write a quantized model as a compressed-tensors (CT) checkpoint that transformers and vLLM load.

weightlab's quantizers fake-quantize in place and keep each layer's integers (``AffineQuant``).
This module turns those into CT's ``pack-quantized`` layout *through the compressed-tensors
library itself* (apply_quantization_config -> our scales -> ModelCompressor.compress_model ->
update_config), so the on-disk layout is whatever CT defines, not our reading of it. CT
re-derives codes as round(w / s); we therefore put the exact grid values s*q into the weights
first and check afterwards that the packed codes equal weightlab's codes (a silent mismatch
would otherwise ship a different model). docs/design.md "Deployment formats" has the reasons
behind every refusal below (measured with compressed-tensors 0.20.1 and transformers 5.25).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, MissingDependencyError
from ..tensor.quant import AffineQuant
from ..tensor.quant8 import FloatQuant, scale_from_absmax
from .cards import ct_card, merge_card, sparsity_of

FORMATS = ("compressed-tensors", "hf")
# vLLM's WNA16 kernels serve 4- and 8-bit codes; CT changed how 3/5/6/7-bit codes straddle int32
# words at 0.18 with no version field a loader reads, so other widths would be ambiguous on disk.
CT_BITS = (4, 8)
CT_GROUPS = (32, 64, 128)  # Marlin/Machete group sizes; <= 0 means one scale per output channel
ASYM_WARNING = ("asymmetric pack-quantized checkpoints do not load with transformers' default loader "
                "(weight_zero_point size mismatch); load with AutoModelForCausalLM.from_pretrained(path, "
                "quantization_config=CompressedTensorsConfig(dequantize=True)), or quantize with --sym (what "
                "vLLM's kernels take everywhere)")


def _ct():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise MissingDependencyError("compressed-tensors", "writing a compressed-tensors checkpoint",
                                     "'weightlab[hf]'") from None
    import compressed_tensors

    return compressed_tensors


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ConfigError(f"unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return fmt


def check_request(method: str, bits: int | None, group_size: int, params: dict | None = None,
                  in_features=()) -> None:
    """Refuse, before any work, a quantization that cannot be written as compressed-tensors."""
    from ..registry import get_method

    params = params or {}
    method = get_method("compress", method).name  # aliases and spelling as the registry resolves them
    if method not in ("rtn", "gptq", "awq", "smoothquant", "fp8"):
        raise ConfigError(f"{method} layers have no compressed-tensors layout (only the affine grids of rtn/gptq/awq/"
                          "smoothquant and fp8's do); use --format hf (dequantized weights)")
    if method == "fp8":
        if group_size > 0:
            raise ConfigError(f"fp8 scales are per channel or per tensor, not groups of {group_size}; pass "
                              "--group-size -1")
        return
    if bits is not None and bits not in CT_BITS:
        raise ConfigError(f"compressed-tensors output is written for {' or '.join(map(str, CT_BITS))}-bit codes, "
                          f"not {bits}: CT 0.18 changed the {bits}-bit packing without a version gate and vLLM "
                          "serves 4/8 bits; use --format hf")
    if group_size > 0 and group_size not in CT_GROUPS:
        raise ConfigError(f"group size {group_size} is not served by vLLM's kernels; use one of "
                          f"{', '.join(map(str, CT_GROUPS))} or -1 (per channel), or --format hf")
    gptq = method == "gptq" or (method in ("awq", "smoothquant") and params.get("quantizer") == "gptq")
    if gptq and params.get("act_order") and group_size > 0 and not params.get("static_groups"):
        raise ConfigError("GPTQ act-order with groups permutes the group of each column (g_idx), which "
                          "compressed-tensors 0.20 cannot write; add --param static_groups=true (groups then stay "
                          "in column order) or use --format hf")
    widths = dict(in_features)
    for name, cols in widths.items():
        if group_size > 0 and cols % group_size:
            fits = [g for g in CT_GROUPS if all(c % g == 0 for c in widths.values())]
            raise ConfigError(f"{name} has {cols} input columns, not a multiple of group size {group_size}; "
                              "compressed-tensors needs whole groups: use --group-size "
                              + " or ".join(map(str, [*fits, -1])) + " (-1 = per channel), or --format hf")


def linear_in_features(layers: dict) -> dict:
    """Input width of every target layer; a non-Linear one (GPT-2's Conv1D) is refused: CT targets nn.Linear."""
    for n, m in layers.items():
        if not isinstance(m, nn.Linear):
            raise ConfigError(f"{n} is a {type(m).__name__}, not nn.Linear; compressed-tensors targets Linear "
                              "layers only; use --format hf")
    return {n: m.weight.shape[1] for n, m in layers.items()}


def weight_args(quantized: dict, layers: dict) -> dict:
    """The single CT ``weights`` QuantizationArgs all quantized layers share (or a ConfigError)."""
    kinds = set()
    fp8 = {type(q) is FloatQuant for q in quantized.values()}
    if fp8 == {True}:
        strategies = {q.strategy for q in quantized.values()}
        if len(strategies) != 1:
            raise ConfigError(f"fp8 layers with different scale strategies {sorted(strategies)}; one compressed-tensors "
                              "config group needs one")
        return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategies.pop()}
    for name, q in quantized.items():
        if not isinstance(q, AffineQuant):
            raise ConfigError(f"{name}: {type(q).__name__} layers have no compressed-tensors layout; use --format hf")
        if not isinstance(layers[name], nn.Linear):
            raise ConfigError(f"{name} is a {type(layers[name]).__name__}, not nn.Linear; compressed-tensors "
                              "targets Linear layers only; use --format hf")
        if not q.trivial_g_idx:
            raise ConfigError(f"{name}: act-order permuted the groups (g_idx), which compressed-tensors 0.20 cannot "
                              "write; quantize with static_groups=true or use --format hf")
        gs = q.group_size if q.group_size > 0 else -1
        kinds.add((q.bits, gs, q.sym))
        check_request("rtn", q.bits, gs, in_features={name: q.codes.shape[1]})
    if len(kinds) != 1:
        raise ConfigError(f"layers were quantized with different settings {sorted(kinds)}; one compressed-tensors "
                          "config group needs one setting")
    bits, gs, sym = kinds.pop()
    args = {"num_bits": bits, "type": "int", "symmetric": sym, "strategy": "group" if gs > 0 else "channel"}
    if gs > 0:
        args["group_size"] = gs
    return args


def ct_codes(q: AffineQuant) -> tuple[torch.Tensor, torch.Tensor]:
    """weightlab's unsigned codes/zeros [0, 2^b) -> CT's signed ones [-2^(b-1), 2^(b-1)), same w_hat."""
    off = 2 ** (q.bits - 1)
    return q.codes.to(torch.int16) - off, q.zeros.to(torch.int16) - off


def scheme_name(args: dict, inputs: dict | None = None, kv: bool = False) -> str:
    """llm-compressor's preset name where one fits (W4A16, W8A8, FP8, FP8_DYNAMIC), else a description."""
    if inputs is None:
        name = f"W{args['num_bits']}A16" + ("" if args["symmetric"] else "_ASYM")
        if args["type"] == "float":
            name = "FP8A16"
    elif args["type"] == "int":
        name = "W8A8" if inputs["dynamic"] else "W8A8_STATIC"
    elif (args["strategy"], inputs["dynamic"]) == ("channel", True):
        name = "FP8_DYNAMIC"
    elif (args["strategy"], inputs["dynamic"]) == ("tensor", False):
        name = "FP8"
    else:
        name = f"FP8_{args['strategy'].upper()}_{'DYNAMIC' if inputs['dynamic'] else 'STATIC'}"
    return name + ("+KV_FP8" if kv else "")


def input_args(act, quantized: dict) -> dict | None:
    """CT ``input_activations`` QuantizationArgs of an activations.ActScheme (None: weight-only)."""
    if act is None or act.inputs == "none":
        return None
    if act.inputs == "dynamic":
        return {"num_bits": 8, "type": act.kind, "symmetric": True, "strategy": "token", "dynamic": True}
    missing = [n for n, q in quantized.items() if q.input_absmax is None]
    if missing:
        raise ConfigError(f"{missing[0]}: static activations need a calibrated input range (quantize with "
                          "activations='static')")
    return {"num_bits": 8, "type": act.kind, "symmetric": True, "strategy": "tensor", "dynamic": False,
            "observer": act.observer}


def kv_args(act) -> dict:
    """CT ``kv_cache_scheme``: FP8 per tensor, static (llm-compressor's kv_cache_scheme for vLLM's FP8 KV cache)."""
    return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False,
            "observer": act.observer}


def save_compressed_tensors(out, quantized: dict, model: nn.Module, ck, *, provenance=None, force: bool = False,
                            extra_files: dict | None = None, inputs=(), act=None) -> dict:
    """Write ``model`` (fake-quantized; integer layers in ``quantized``) as a CT pack-quantized folder.

    ``ck`` is the source checkpoint: every tensor it holds is written (in its dtype), quantized
    Linear weights replaced by ``weight_packed`` / ``weight_scale`` / ``weight_shape`` (+ zero
    points when asymmetric). The model is consumed: its quantized Linears end up compressed.
    Returns a summary (scheme, bits per weight, sparsity, warnings); the model card says the same.
    """
    from ..io.writer import CheckpointWriter

    tensors, config, summary = to_compressed_tensors(quantized, model, ck, act)
    if provenance is not None:
        provenance.card = merge_card(provenance.card, ct_card(summary, config))
    with CheckpointWriter(out, template=ck.path, provenance=provenance, force=force, inputs=inputs) as w:
        for n, t in tensors.items():
            w.add(n, t)
        for fname, content in (extra_files or {}).items():
            w.add_file(fname, content)
        w.add_file("config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    return summary


class _quiet_tqdm:
    """compressed-tensors' own progress bars off for one call (weightlab shows its own progress; written
    block by block, the library would print two bars per block). Its modules import ``tqdm`` by name."""

    MODULES = ("compressed_tensors.compressors.model_compressors.model_compressor",
               "compressed_tensors.quantization.lifecycle.apply")

    def __enter__(self):
        import importlib

        self.saved = []
        for name in self.MODULES:
            try:
                mod = importlib.import_module(name)
            except ImportError:
                continue
            if hasattr(mod, "tqdm"):
                self.saved.append((mod, mod.tqdm))
                mod.tqdm = lambda it=None, *a, **k: it

    def __exit__(self, *exc):
        for mod, orig in self.saved:
            mod.tqdm = orig


def to_compressed_tensors(quantized: dict, model: nn.Module, ck, act=None) -> tuple[dict, dict, dict]:
    """(tensors to write in ``ck``'s order, config.json with quantization_config, summary); see save_...

    ``act``: the activations.ActScheme the model was quantized with (input_activations, kv_cache_scheme);
    ``quantized`` may hold activations.KVRange entries (attention module -> calibrated k/v ranges)."""
    ct = _ct()
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationStatus,
                                                 apply_quantization_config)

    from .activations import KVRange

    kv = {n: r for n, r in quantized.items() if isinstance(r, KVRange)}
    quantized = {n: q for n, q in quantized.items() if not isinstance(q, KVRange)}
    if kv and not (act is not None and act.kv_cache):
        raise ConfigError("KV-cache ranges without a KV-cache scheme (pass the report's act)")
    mods = dict(model.named_modules())
    args = weight_args(quantized, {n: mods[n] for n in quantized})
    iargs = input_args(act, quantized)
    first = next(iter(quantized))
    dtype = ck.info(f"{first}.weight").dtype
    for name, q in quantized.items():
        # transformers creates weight_scale in the model's dtype on load: a scale that dtype cannot
        # hold exactly would dequantize to other weights than the ones weightlab measured
        if not torch.equal(q.scales.to(dtype).to(q.scales.dtype), q.scales):
            raise ConfigError(f"{name}: {str(q.scales.dtype).removeprefix('torch.')} scales are not exact in the "
                              f"checkpoint dtype {str(dtype).removeprefix('torch.')}; quantize with scale_dtype="
                              f"{str(dtype).removeprefix('torch.')}")
    ignore = sorted(n for n, m in mods.items() if isinstance(m, nn.Linear) and n not in quantized)
    for name, q in quantized.items():
        # float32 s*q is within a few ulps of the grid value, so CT's round(w/s) finds q again (checked below)
        mods[name].weight = nn.Parameter(q.dequantize(), requires_grad=False)
    group = {"targets": ["Linear"], "weights": args, **({"input_activations": iargs} if iargs else {})}
    qc = QuantizationConfig(config_groups={"group_0": group}, ignore=ignore)
    with _quiet_tqdm():  # the library's own bars, once per call (per block when writing sequentially)
        apply_quantization_config(model, qc)
    for name, q in quantized.items():
        m = mods[name]
        m.weight_scale.data.copy_(q.scales.to(torch.float32).reshape(m.weight_scale.shape))
        if not args["symmetric"]:
            m.weight_zero_point.data.copy_(ct_codes(q)[1].reshape(m.weight_zero_point.shape))
        if iargs and not iargs["dynamic"]:
            m.input_scale.data.copy_(scale_from_absmax(q.input_absmax, act.kind).reshape(m.input_scale.shape))
        m.quantization_status = QuantizationStatus.FROZEN
    comp = ModelCompressor.from_pretrained_model(model)
    with _quiet_tqdm():
        comp.compress_model(model)
    sd = model.state_dict()
    _check_stored(quantized, sd, args, unpack_from_int32)
    numel = sum(q.codes.numel() for q in quantized.values())
    if kv:  # CT infers the scheme from attention modules; a holder of Linears has none, so it is set here
        comp.quantization_config.kv_cache_scheme = QuantizationArgs(**kv_args(act))

    with tempfile.TemporaryDirectory() as tmp:
        # update_config is CT's own writer of the quantization_config block: use it, then read it back
        (Path(tmp) / "config.json").write_text(json.dumps(ck.config or {}))
        comp.update_config(tmp)
        config = json.loads((Path(tmp) / "config.json").read_text())

    suffixes = ("weight_packed", "weight", "weight_scale", "weight_shape", "weight_zero_point", "input_scale")
    stored = {f"{layer}.{s}": sd[f"{layer}.{s}"] for layer in quantized for s in suffixes if f"{layer}.{s}" in sd}
    # scales in the checkpoint dtype; the codes (int32 words, int8 or float8 weights) as CT stored them
    stored = {n: t.to(dtype) if n.endswith("_scale") else t for n, t in stored.items()}
    for attn, r in kv.items():  # the names vLLM's compressed-tensors KV-cache loader reads
        ks, vs = r.scales()
        stored[f"{attn}.k_scale"], stored[f"{attn}.v_scale"] = ks.reshape(1).to(dtype), vs.reshape(1).to(dtype)
    packed_bits = sum(t.numel() * t.element_size() * 8 for n, t in stored.items() if not n.endswith(("k_scale",
                                                                                                      "v_scale")))
    # pruning shows as zeros in the weights that were quantized (the source's); zero *codes* alone
    # are not sparsity (a 4-bit grid rounds ~15% of a dense layer to 0)
    sparsity = sparsity_of(ck.get(f"{n}.weight") for n in quantized)
    summary = {"format": "compressed-tensors", "ct_format": config["quantization_config"]["format"],
               "scheme": scheme_name(args, iargs, bool(kv)), "weights": args, "input_activations": iargs,
               "kv_cache_scheme": kv_args(act) if kv else None, "ignore": ignore,
               "compressed_tensors_version": ct.__version__, "quantized_layers": len(quantized),
               "quantized_weights": numel, "bits_per_weight": packed_bits / numel if numel else 0.0,
               **sparsity, "warnings": [] if args["symmetric"] else [ASYM_WARNING]}
    tensors = {}
    for n in ck.names():
        layer = n.removesuffix(".weight")
        if n.endswith(".weight") and layer in quantized:
            tensors.update({f"{layer}.{s}": stored[f"{layer}.{s}"] for s in suffixes if f"{layer}.{s}" in stored})
        else:
            tensors[n] = sd[n].to(ck.info(n).dtype) if n in sd else ck.get(n)
    for attn in kv:
        tensors[f"{attn}.k_scale"], tensors[f"{attn}.v_scale"] = stored[f"{attn}.k_scale"], stored[f"{attn}.v_scale"]
    return tensors, config, summary


def _check_stored(quantized: dict, sd: dict, args: dict, unpack_from_int32) -> None:
    """Every code CT stored equals weightlab's (packed int32 words, int8 or float8 weights); or a ConfigError."""
    for name, q in quantized.items():
        if isinstance(q, FloatQuant):
            got = sd[f"{name}.weight"]
            same = got.dtype == q.codes.dtype and torch.equal(got.view(torch.uint8), q.codes.view(torch.uint8))
        else:
            codes, zeros = ct_codes(q)
            if f"{name}.weight_packed" in sd:
                got = unpack_from_int32(sd[f"{name}.weight_packed"], q.bits, torch.Size(q.codes.shape))
            else:  # int-quantized: int8 codes as they are
                got = sd[f"{name}.weight"]
            same = not got.is_floating_point() and torch.equal(got.to(torch.int16), codes)
        if not same:
            raise ConfigError(f"{name}: compressed-tensors stored other codes than weightlab's (weights off the "
                              "quantization grid?); nothing was written")
        if not args["symmetric"]:
            zp = sd[f"{name}.weight_zero_point"]
            if zp.dtype == torch.int32:  # group/channel zero points are packed along the output dim
                zp = unpack_from_int32(zp, q.bits, torch.Size(zeros.shape), packed_dim=0)
            if not torch.equal(zp.to(torch.int16), zeros):
                raise ConfigError(f"{name}: compressed-tensors stored other zero points than weightlab's")
        elif any(f"{name}.{z}" in sd for z in ("weight_zero_point", "input_zero_point")):
            raise ConfigError(f"{name}: a symmetric scheme must not carry zero points (vLLM refuses them)")


class CompressedTensorsSource:
    """A recipe step's compressed-tensors output: the tensors, plus the config.json and model card the
    recipe runner writes with them (``extra_files``, ``card``). Nothing can run on packed tensors, so
    the step must be the recipe's last (recipe/runner.py checks)."""

    def __init__(self, quantized: dict, model: nn.Module, source):
        from ..engine.source import root_path

        self.inner = source
        self.path = root_path(source)
        self.sd, self.config, self.summary = to_compressed_tensors(quantized, model, source)
        self.extra_files = {"config.json": json.dumps(self.config, indent=2, sort_keys=True) + "\n"}
        self.card = ct_card(self.summary, self.config)

    def names(self) -> list[str]:
        return list(self.sd)

    def info(self, name: str):
        from ..io.reader import TensorInfo

        t = self.sd[name]
        return TensorInfo(name, tuple(t.shape), t.dtype, "<memory>")

    def get(self, name: str) -> torch.Tensor:
        return self.sd[name]
