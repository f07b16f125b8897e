"""BigNAS supernets for the zoo's classifiers: an elastic MLP and an elastic residual CNN (2-D or 1-D).

A child is a ``Child`` (per-layer widths, per-stage depths, per-stage kernels). Its tensors are *views* of the
supernet's parameters (``child_tensors``): the first c output / input channels, the first d blocks of a stage,
the centre k x k crop of the largest kernel. Training runs the child through the same functional forward as
the stand-alone child module (``mlp_forward`` / ``cnn_forward``), so a copied child computes exactly what the
child computed inside the supernet. Widths are multipliers of each layer's largest width (WIDTH_MULTS).

BatchNorm: during supernet training the batch statistics normalize and nothing is tracked (AttentiveNAS trains
with momentum 0); before a child is evaluated its statistics are recalibrated (``calibrate`` in bignas.py),
and the supernet remembers which child its running statistics belong to, so an uncalibrated child cannot be
evaluated by mistake.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

WIDTH_MULTS = (0.25, 0.5, 0.75, 1.0)
NETS = ("mlp", "cnn", "lm")


@dataclass(frozen=True)
class Child:
    """One architecture of the space. widths: units per hidden layer (MLP), channels per stage (CNN) or MLP
    hidden units per block (LM); depths: (hidden layers,) for the MLP and (blocks,) for the LM, blocks per stage
    for the CNN; kernels: per stage (CNN only); heads: attention heads per block (LM only)."""

    widths: tuple[int, ...]
    depths: tuple[int, ...]
    kernels: tuple[int, ...] = field(default=())
    heads: tuple[int, ...] = field(default=())

    def as_dict(self) -> dict:  # heads only where the net has them (MLP / CNN dicts stay as they were)
        return {k: list(v) for k, v in asdict(self).items() if k != "heads" or v}

    @classmethod
    def from_dict(cls, d: dict) -> Child:
        try:
            return cls(tuple(int(w) for w in d["widths"]), tuple(int(x) for x in d["depths"]),
                       tuple(int(k) for k in d.get("kernels", ())), tuple(int(h) for h in d.get("heads", ())))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"a child needs integer lists widths, depths (and kernels): {d!r} ({e})") from None


def width_choices(c_max: int) -> tuple[int, ...]:
    return tuple(sorted({max(1, round(m * c_max)) for m in WIDTH_MULTS}))


class ElasticNet(nn.Module):
    """What the trainer and the search need from a supernet; subclasses define the space and the slicing."""

    net = ""

    def __init__(self):
        super().__init__()
        self.calibrated: Child | None = None  # the child whose BN statistics the buffers hold (None: none)
        self._active: Child | None = None

    # --- the space --------------------------------------------------------------------------
    def space(self) -> dict[str, list[tuple[int, ...]]]:
        """Per field of Child, the choices at each position."""
        raise NotImplementedError

    def max_child(self) -> Child:
        return Child(**{k: tuple(max(c) for c in v) for k, v in self.space().items()})

    def min_child(self) -> Child:
        return Child(**{k: tuple(min(c) for c in v) for k, v in self.space().items()})

    def random_child(self, rng: random.Random) -> Child:
        return Child(**{k: tuple(rng.choice(c) for c in v) for k, v in self.space().items()})

    def check_child(self, child: Child) -> Child:
        for k, per_pos in self.space().items():
            got = getattr(child, k)
            if len(got) != len(per_pos) or any(g not in c for g, c in zip(got, per_pos)):
                raise ConfigError(f"{k}={list(got)} is not in this {self.net} supernet's space: "
                                  f"choices per position {[list(c) for c in per_pos]}")
        return child

    def uniform_child(self, width: float = 1.0, depth: int | None = None, kernel: int | None = None) -> Child:
        """Every layer at `width` x its largest width; every stage at `depth` blocks; every kernel `kernel`."""
        if width not in WIDTH_MULTS:
            raise ConfigError(f"width multiplier {width} is not one of {list(WIDTH_MULTS)}")
        sp = self.space()
        mx = self.max_child()
        widths = tuple(max(1, round(width * w)) for w in mx.widths)
        depths = mx.depths if depth is None else (int(depth),) * len(mx.depths)
        kernels = mx.kernels if kernel is None else (int(kernel),) * len(mx.kernels)
        if kernel is not None and not mx.kernels:
            raise ConfigError(f"a {self.net} supernet has no kernel sizes; leave --kernel out")
        for name, got in (("depth", depths), ("kernel", kernels)):
            choices = sp[name + "s"]
            if any(g not in c for g, c in zip(got, choices)):
                raise ConfigError(f"{name} {got[0]} is not in this {self.net} supernet's space "
                                  f"(choices {sorted(set().union(*map(set, choices)))})")
        return Child(widths, depths, kernels)

    # --- slicing ----------------------------------------------------------------------------
    def child_tensors(self, child: Child, buffers: bool = True) -> dict[str, torch.Tensor]:
        """The child's tensors under the stand-alone child's names, as views of this supernet's."""
        raise NotImplementedError

    def child_arch(self, child: Child) -> dict:
        raise NotImplementedError

    def child_params(self, child: Child) -> int:
        """Trainable parameters of the child (what a stand-alone copy holds, buffers excluded)."""
        return sum(t.numel() for t in self.child_tensors(child, buffers=False).values())

    def example_input(self, batch: int = 1) -> torch.Tensor:
        """A random input batch of the supernet's input shape (latency measurement)."""
        return torch.randn(batch, getattr(self, "in_features", None) or self.side ** self.dims)

    def static_child(self, child: Child) -> nn.Module:
        """A stand-alone copy of the child (its own storage), in eval mode."""
        model = build_child(self.child_arch(self.check_child(child)))
        sd = {k: v.detach().clone() for k, v in self.child_tensors(child).items()}
        model.load_state_dict(sd, strict=True)
        return model.eval()

    # --- running ----------------------------------------------------------------------------
    def set_child(self, child: Child) -> None:
        self._active = self.check_child(child)

    @property
    def active(self) -> Child:
        return self._active or self.max_child()

    def arch(self) -> dict:
        raise NotImplementedError


# --------------------------------------------------------------------------------------------- MLP
def mlp_forward(t: dict[str, torch.Tensor], depth: int, x: torch.Tensor, dropout=None) -> torch.Tensor:
    """The zoo MLP's forward on named tensors body.{2i}.weight/bias (hidden i) and body.{2*depth} (the head)."""
    h = x.flatten(1)
    for i in range(depth):
        h = F.relu(F.linear(h, t[f"body.{2 * i}.weight"], t[f"body.{2 * i}.bias"]))
    if dropout is not None:
        h = dropout(h)
    return F.linear(h, t[f"body.{2 * depth}.weight"], t[f"body.{2 * depth}.bias"])


class ElasticMLP(ElasticNet):
    """Hidden Linear+ReLU layers (the zoo's MLP); a child keeps its first `depth` layers, each at its own width,
    and the shared head reads the first units of the last kept layer. Children are zoo MLPs."""

    net = "mlp"

    def __init__(self, in_features: int, num_classes: int, hidden: tuple[int, ...] = (128, 128, 128),
                 dropout: float = 0.2):
        super().__init__()
        if not hidden:
            raise ConfigError("an elastic MLP needs at least one hidden layer")
        self.in_features, self.num_classes, self.hidden = int(in_features), int(num_classes), tuple(hidden)
        dims = (self.in_features,) + self.hidden
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.head = nn.Linear(max(self.hidden), self.num_classes)
        self.dropout = nn.Dropout(dropout)

    def arch(self) -> dict:
        return {"net": "mlp", "in_features": self.in_features, "num_classes": self.num_classes,
                "hidden": list(self.hidden), "dropout": self.dropout.p}

    def space(self):
        return {"widths": [width_choices(h) for h in self.hidden],
                "depths": [tuple(range(1, len(self.hidden) + 1))], "kernels": []}

    def child_tensors(self, child, buffers=True):
        d = child.depths[0]
        t, c_in = {}, self.in_features
        for i in range(d):
            c = child.widths[i]
            t[f"body.{2 * i}.weight"] = self.layers[i].weight[:c, :c_in]
            t[f"body.{2 * i}.bias"] = self.layers[i].bias[:c]
            c_in = c
        t[f"body.{2 * d}.weight"] = self.head.weight[:, :c_in]
        t[f"body.{2 * d}.bias"] = self.head.bias
        return t

    def child_arch(self, child):
        d = child.depths[0]
        return {"net": "mlp", "in_features": self.in_features, "num_classes": self.num_classes,
                "hidden": list(child.widths[:d])}

    def forward(self, x):
        child = self.active
        drop = self.dropout if self.training and child == self.max_child() else None
        return mlp_forward(self.child_tensors(child), child.depths[0], x, drop)


# --------------------------------------------------------------------------------------------- CNN
def cnn_forward(t: dict[str, torch.Tensor], depths, x: torch.Tensor, bn, dims: int, side: int,
                dropout=None) -> torch.Tensor:
    """Residual CNN on named tensors: per stage s a transition conv (stages.s.conv, .bn), then depth-1 blocks
    conv1-bn1-ReLU-conv2-bn2 (+ input, ReLU); 2x max pool between stages; adaptive average pool to 4 cells
    (2x2 or 4); linear head. `bn(x, prefix)` normalizes with the tensors under prefix (mode chosen by caller)."""
    conv = F.conv2d if dims == 2 else F.conv1d
    pool = F.max_pool2d if dims == 2 else F.max_pool1d
    h = x.reshape(-1, 1, side, side) if dims == 2 else x.reshape(-1, 1, side)

    def cbr(h, w, p, relu=True):
        h = bn(conv(h, w, padding=w.shape[-1] // 2), p)
        return F.relu(h) if relu else h

    for s, d in enumerate(depths):
        p = f"stages.{s}."
        h = cbr(h, t[p + "conv.weight"], p + "bn")
        for j in range(d - 1):
            q = f"{p}blocks.{j}."
            r = cbr(h, t[q + "conv1.weight"], q + "bn1")
            h = F.relu(h + cbr(r, t[q + "conv2.weight"], q + "bn2", relu=False))
        if s < len(depths) - 1:
            h = pool(h, 2)
    h = (F.adaptive_avg_pool2d(h, 2) if dims == 2 else F.adaptive_avg_pool1d(h, 4)).flatten(1)
    if dropout is not None:
        h = dropout(h)
    return F.linear(h, t["head.weight"], t["head.bias"])


def _crop(w: torch.Tensor, k: int) -> torch.Tensor:
    m = (w.shape[-1] - k) // 2  # centre crop of the largest kernel
    return w[..., m:m + k, m:m + k] if w.dim() == 4 else w[..., m:m + k]


def _conv(dims: int, c_in: int, c_out: int, k: int) -> nn.Module:
    return (nn.Conv2d if dims == 2 else nn.Conv1d)(c_in, c_out, k, padding=k // 2, bias=False)


def _bn(dims: int, c: int) -> nn.Module:
    return nn.BatchNorm2d(c) if dims == 2 else nn.BatchNorm1d(c)


def _stages(dims: int, widths, depths, kernels) -> nn.ModuleList:
    stages, c_in = nn.ModuleList(), 1
    for c, d, k in zip(widths, depths, kernels):
        st = nn.Module()
        st.conv, st.bn = _conv(dims, c_in, c, k), _bn(dims, c)
        st.blocks = nn.ModuleList()
        for _ in range(d - 1):
            b = nn.Module()
            b.conv1, b.bn1, b.conv2, b.bn2 = _conv(dims, c, c, k), _bn(dims, c), _conv(dims, c, c, k), _bn(dims, c)
            st.blocks.append(b)
        stages.append(st)
        c_in = c
    return stages


class ElasticCNN(ElasticNet):
    """Stages of residual blocks with elastic width, depth and kernel (centre crop); 8x8 images (dims=2) or
    1-D sequences such as MNIST-1D (dims=1). The last BN of every residual block starts at gamma = 0 (the
    paper's init), so every block is the identity at init and depth children agree."""

    net = "cnn"

    def __init__(self, num_classes: int, dims: int = 2, side: int = 8, widths=(12, 16, 24), depths=(2, 2, 2),
                 kernels=(3, 5), dropout: float = 0.2):
        super().__init__()
        if dims not in (1, 2):
            raise ConfigError(f"an elastic CNN is 1-D or 2-D, not {dims}-D")
        self.num_classes, self.dims, self.side = int(num_classes), int(dims), int(side)
        self.widths, self.depths, self.kernels = tuple(widths), tuple(depths), tuple(sorted(kernels))
        if any(k % 2 == 0 for k in self.kernels):
            raise ConfigError(f"kernel sizes must be odd (centre crops): {list(self.kernels)}")
        kmax = self.kernels[-1]
        self.stages = _stages(self.dims, self.widths, self.depths, (kmax,) * len(self.widths))
        self.head = nn.Linear(self.widths[-1] * 4, self.num_classes)
        self.dropout = nn.Dropout(dropout)
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for st in self.stages:
            for b in st.blocks:
                nn.init.zeros_(b.bn2.weight)  # BigNAS init: each residual block is the identity at init

    def arch(self) -> dict:
        return {"net": "cnn", "num_classes": self.num_classes, "dims": self.dims, "side": self.side,
                "widths": list(self.widths), "depths": list(self.depths), "kernels": list(self.kernels),
                "dropout": self.dropout.p}

    def space(self):
        return {"widths": [width_choices(c) for c in self.widths],
                "depths": [tuple(range(1, d + 1)) for d in self.depths],
                "kernels": [self.kernels] * len(self.widths)}

    def child_tensors(self, child, buffers=True):
        t, c_in = {}, 1
        names = ("weight", "bias", "running_mean", "running_var") if buffers else ("weight", "bias")

        def bn(prefix, mod, c):
            for n in names:
                t[f"{prefix}.{n}"] = getattr(mod, n)[:c]

        for s, (c, d, k) in enumerate(zip(child.widths, child.depths, child.kernels)):
            st, p = self.stages[s], f"stages.{s}."
            t[p + "conv.weight"] = _crop(st.conv.weight[:c, :c_in], k)
            bn(p + "bn", st.bn, c)
            for j in range(d - 1):
                b, q = st.blocks[j], f"{p}blocks.{j}."
                t[q + "conv1.weight"] = _crop(b.conv1.weight[:c, :c], k)
                bn(q + "bn1", b.bn1, c)
                t[q + "conv2.weight"] = _crop(b.conv2.weight[:c, :c], k)
                bn(q + "bn2", b.bn2, c)
            c_in = c
        t["head.weight"] = self.head.weight[:, :c_in * 4]  # flatten is channel-major: first c_in channels
        t["head.bias"] = self.head.bias
        return t

    def child_arch(self, child):
        return {"net": "cnn", "num_classes": self.num_classes, "dims": self.dims, "side": self.side,
                "widths": list(child.widths), "depths": list(child.depths), "kernels": list(child.kernels)}

    def forward(self, x, bn=None):
        child = self.active
        t = self.child_tensors(child)
        drop = self.dropout if self.training and child == self.max_child() else None
        return cnn_forward(t, child.depths, x, bn or self._bn_fn(t, child), self.dims, self.side, drop)

    def _bn_fn(self, t, child):
        if self.training:  # batch statistics only; running statistics belong to calibration
            return lambda h, p: F.batch_norm(h, None, None, t[p + ".weight"], t[p + ".bias"], True, 0.0, 1e-5)
        if self.calibrated != child:
            raise ConfigError(f"the BN statistics of child {child.as_dict()} were not calibrated (they belong to "
                              f"{self.calibrated.as_dict() if self.calibrated else 'no child'}); call "
                              "weightlab.elastic.bignas.calibrate(net, child, x_train) first")
        return lambda h, p: F.batch_norm(h, t[p + ".running_mean"], t[p + ".running_var"], t[p + ".weight"],
                                         t[p + ".bias"], False, 0.0, 1e-5)


# --------------------------------------------------------------------------------- stand-alone children
class BigNASCNN(nn.Module):
    """A stand-alone child of an ElasticCNN: ordinary Conv/BatchNorm/Linear modules with the supernet's names."""

    def __init__(self, num_classes: int, dims: int, side: int, widths, depths, kernels):
        super().__init__()
        self.dims, self.side, self.depths = int(dims), int(side), tuple(depths)
        self.stages = _stages(self.dims, widths, depths, kernels)
        self.head = nn.Linear(int(widths[-1]) * 4, int(num_classes))

    def forward(self, x):
        mods = dict(self.named_modules())

        def bn(h, p):  # the module's own BN: running statistics update in train mode, as usual
            return mods[p](h)

        return cnn_forward(dict(self.named_parameters()), self.depths, x, bn, self.dims, self.side)


def build_child(arch: dict) -> nn.Module:
    """The stand-alone model an arch dict (child_arch, or a child folder's config) describes."""
    from ..zoo import MLP

    try:
        if arch["net"] == "mlp":
            return MLP(int(arch["in_features"]), tuple(int(h) for h in arch["hidden"]), int(arch["num_classes"]))
        if arch["net"] == "cnn":
            return BigNASCNN(arch["num_classes"], arch["dims"], arch["side"], arch["widths"], arch["depths"],
                             arch["kernels"])
        if arch["net"] == "lm":
            from .bignas_lm import BigNASLM

            return BigNASLM(arch["vocab_size"], arch["context"], arch["d_model"], arch["head_dim"], arch["heads"],
                            arch["mlp_hidden"])
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"incomplete BigNAS child description {arch!r}: {e}") from None
    raise ConfigError(f"unknown BigNAS net {arch.get('net')!r}; valid: {', '.join(NETS)}")


def build_supernet(arch: dict) -> ElasticNet:
    a = dict(arch)
    net = a.pop("net", None)
    try:
        if net == "mlp":
            return ElasticMLP(a["in_features"], a["num_classes"], tuple(a["hidden"]), a.get("dropout", 0.2))
        if net == "cnn":
            return ElasticCNN(a["num_classes"], a["dims"], a["side"], tuple(a["widths"]), tuple(a["depths"]),
                              tuple(a["kernels"]), a.get("dropout", 0.2))
        if net == "lm":
            from .bignas_lm import ElasticLM

            return ElasticLM(a["vocab_size"], a["context"], a["d_model"], a["layers"], a["heads"], a["mlp_hidden"],
                             a["head_dim"], a.get("dropout", 0.1))
    except (KeyError, TypeError) as e:
        raise ConfigError(f"incomplete BigNAS supernet description {arch!r}: {e}") from None
    raise ConfigError(f"unknown BigNAS net {net!r}; valid: {', '.join(NETS)}")
