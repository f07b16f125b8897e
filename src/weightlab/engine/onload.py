"""Sequential onloading: a transformers model whose blocks stay on the meta device until needed.

The skeleton is built with ``accelerate.init_empty_weights`` (parameters on ``meta``, buffers
such as RoPE's ``inv_freq`` computed for real, since checkpoints do not store them). The
resident modules (embeddings, rotary embedding, final norm) are read from the checkpoint once;
``lm_head`` only when logits are needed (evaluation), never for calibration. Block *i* is read
tensor by tensor from the checkpoint (copied out of the memory map, whose pages are dropped at
once), assigned into the block with ``load_state_dict(strict=True, assign=True)``, used, and
sent back to ``meta``. Host and device memory are one block + the activation cache + the
resident modules, whatever the depth.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..io.reader import open_checkpoint
from .calibration import find_blocks
from .memory import large_allocations_to_mmap


def _meta_names(module: nn.Module) -> list[str]:
    return [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]


class OnloadedModel:
    """``model`` is a skeleton; ``load_block(i)`` / ``free_block(i)`` move one block's weights in and out."""

    def __init__(self, path: str | os.PathLike, task: str = "causal-lm", *, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, resident_device: torch.device | str = "cpu",
                 load_head: bool = False):
        from ..io.hf import transformers_module

        tf = transformers_module()
        try:
            import accelerate
        except ImportError:  # pragma: no cover - accelerate is in the hf extra
            from ..errors import MissingDependencyError

            raise MissingDependencyError("accelerate", "sequential onloading", "'weightlab[hf]'") from None
        large_allocations_to_mmap()
        self.path = Path(path)
        self.ck = open_checkpoint(path)
        self.device, self.dtype, self.resident_device = torch.device(device), dtype, torch.device(resident_device)
        from ..io.hf import load_config

        config = load_config(path)  # folders, .gguf files; quantized sources are read dequantized
        types = set(getattr(config, "layer_types", None) or [])
        if len(types) > 1:
            raise ConfigError(f"{path}: layers of different attention types ({', '.join(sorted(types))}) "
                              "need per-layer masks; run without --sequential (whole-model path)")
        cls = tf.AutoModelForCausalLM if task == "causal-lm" else tf.AutoModel
        with accelerate.init_empty_weights(include_buffers=False):
            self.model = cls.from_config(config, dtype=dtype).eval()
        self.config = config
        self.blocks_name, self.blocks = find_blocks(self.model, min_len=1)
        if self.blocks is None:
            raise ConfigError(f"{path}: no repeated blocks found; sequential onloading needs a block list "
                              "(model.layers, encoder.layer, ...)")
        self._key = self._key_map()
        self._head_names = self._head_keys()
        self._load_resident(load_head)

    # --- names -----------------------------------------------------------------------
    def _key_map(self) -> dict[str, str]:
        """Model state-dict key -> checkpoint tensor name (identity, or the base-model prefix added/removed)."""
        names = set(self.ck.names())
        prefix = getattr(self.model, "base_model_prefix", "") or ""
        out = {}
        for k in self.model.state_dict():
            for cand in (k, f"{prefix}.{k}", k.removeprefix(f"{prefix}.")):
                if cand in names:
                    out[k] = cand
                    break
        return out

    def _head_keys(self) -> set[str]:
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        if head is None:
            return set()
        mods = {id(m): n for n, m in self.model.named_modules()}
        name = mods.get(id(head))
        return {f"{name}.{k}" for k in head.state_dict()} if name else set()

    def block_prefix(self, i: int) -> str:
        return f"{self.blocks_name}.{i}"

    def block_keys(self, i: int) -> list[str]:
        return list(self.blocks[i].state_dict())

    def checkpoint_name(self, model_key: str) -> str:
        try:
            return self._key[model_key]
        except KeyError:
            raise CheckpointError(f"the checkpoint has no tensor for {model_key}", self.path, model_key) from None

    def block_checkpoint_names(self, i: int) -> list[str]:
        p = self.block_prefix(i)
        return [self.checkpoint_name(f"{p}.{k}") for k in self.block_keys(i)]

    def resident_checkpoint_names(self) -> list[str]:
        """Checkpoint tensors outside every block (embeddings, norms, head, extra buffers)."""
        in_blocks = {c for i in range(len(self.blocks)) for c in self.block_checkpoint_names(i)}
        return [n for n in self.ck.names() if n not in in_blocks]

    # --- resident modules --------------------------------------------------------------
    def _read(self, ck_name: str, device, dtype=None) -> torch.Tensor:
        t = self.ck.get(ck_name)
        dt = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
        out = t.to(device=device, dtype=dt, copy=True)  # a copy: the memory map's pages are dropped next
        del t
        self.ck.release(ck_name)
        return out

    def _load_resident(self, load_head: bool) -> None:
        bp = f"{self.blocks_name}."
        # embedding tables stay in the checkpoint's 16-bit dtype and their rows are cast on lookup: exactly the
        # values of a cast table (bf16/fp16 are subsets of fp32) at half the resident memory (vocab x hidden)
        tables = {f"{n}.weight": m for n, m in self.model.named_modules()
                  if isinstance(m, nn.Embedding) and not n.startswith(bp)}
        sd, missing = {}, []
        for k in self.model.state_dict():
            if k.startswith(bp) or (k in self._head_names and not load_head):
                continue
            if k not in self._key:
                if k in self._head_names and self._tied():
                    continue
                missing.append(k)
                continue
            keep = k in tables and self.dtype == torch.float32 and self.ck.info(self._key[k]).dtype in (
                torch.bfloat16, torch.float16)
            sd[k] = self._read(self._key[k], self.resident_device, None if keep else self.dtype)
            if keep:
                tables[k].register_forward_hook(self._cast_output)
        self.model.load_state_dict(sd, strict=False, assign=True)
        if load_head and self._tied():
            self.load_head(self.resident_device)
        left = [n for n in _meta_names(self.model) if not n.startswith(bp) and (load_head or n not in self._head_names)]
        if left:
            raise CheckpointError(f"tensors missing from the checkpoint for the model's resident modules: "
                                  f"{', '.join(left[:5])}", self.path, left[0])

    def _cast_output(self, module, inputs, output):
        return output.to(self.dtype)

    def _tied(self) -> bool:
        cfg = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
        return bool(getattr(cfg, "tie_word_embeddings", False))

    def load_head(self, device: torch.device | str | None = None) -> nn.Module:
        """Onload the final norm and the LM head (for logits); they stay resident until ``free``."""
        dev = torch.device(device) if device is not None else self.resident_device
        head = self.model.get_output_embeddings()
        if self._tied():
            emb = self.model.get_input_embeddings().weight
            head.weight = emb if emb.dtype == self.dtype else nn.Parameter(emb.detach().to(self.dtype),
                                                                           requires_grad=False)
        else:
            for k in self._head_names:
                mod_name, _, attr = k.rpartition(".")
                mod = self.model.get_submodule(mod_name)
                setattr(mod, attr, nn.Parameter(self._read(self.checkpoint_name(k), dev, self.dtype),
                                                requires_grad=False))
        return head

    # --- blocks ------------------------------------------------------------------------
    def load_block(self, i: int) -> nn.Module:
        """Read block ``i`` from the checkpoint onto the device (strict: every tensor exactly once)."""
        blk = self.blocks[i]
        p = self.block_prefix(i)
        sd = {k: self._read(self.checkpoint_name(f"{p}.{k}"), self.device, self.dtype) for k in self.block_keys(i)}
        blk.load_state_dict(sd, strict=True, assign=True)
        for t in blk.buffers():  # computed buffers (none in Llama) follow the block to the device
            if not t.is_meta and t.device != self.device:
                blk.to(self.device)
                break
        left = _meta_names(blk)
        if left:
            raise CheckpointError(f"block {p} still has tensors without data after loading: {', '.join(left[:5])}",
                                  self.path, f"{p}.{left[0]}")
        return blk

    def block_state(self, i: int) -> dict[str, torch.Tensor]:
        """Block ``i``'s tensors under their checkpoint names, in the checkpoint's dtypes, on the CPU."""
        p = self.block_prefix(i)
        out = {}
        for k, t in self.blocks[i].state_dict().items():
            cn = self.checkpoint_name(f"{p}.{k}")
            out[cn] = t.detach().to(device="cpu", dtype=self.ck.info(cn).dtype)
        return out

    def free_block(self, i: int) -> None:
        self.blocks[i].to_empty(device="meta")

    def weight_view(self, model_key: str) -> torch.Tensor:
        """A read-only view of one tensor straight from the checkpoint (allocations that see every layer)."""
        return self.ck.get(self.checkpoint_name(model_key))

    # --- memory ------------------------------------------------------------------------
    def block_bytes(self, i: int) -> int:
        item = torch.empty((), dtype=self.dtype).element_size()
        return sum(t.numel() for t in self.blocks[i].state_dict().values()) * item

    def resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in list(self.model.parameters()) + list(self.model.buffers())
                   if not t.is_meta)

    def close(self) -> None:
        self.ck.close()
