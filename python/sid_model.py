"""A network trained by sid, in PyTorch: rebuilds the SID cascade from a file written by
`sid-launch export RUN_DIR OUT.safetensors`, loads it and predicts, with early exit.

Needs torch and safetensors only. The backbone's parameters carry the reference
implementations' names (torchvision's resnet18 and vgg11_bn, timm's ViT), so
`model.backbone.state_dict()` loads into those too where the layouts agree (docs/interop.md);
the necks and the belief modules live under `sid.`.

    from sid_model import SidModel
    model = SidModel.load("model.safetensors")
    x = model.normalize(images)             # [B, C, H, W] floats in 0..1, the run's size
    logits = model(x)                        # every module's logits, first to last
    pred, exit_module, confidence = model.predict(x, tau=0.9)

Run as a script, `python sid_model.py MODEL.safetensors` prints what the file holds.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

FORMAT = "sid-export/1"

# sid's VGG-11 configuration "A": output channels of each conv; torchvision's
# `vgg11_bn.features` index of each conv (its BatchNorm is the next index) and of each pool.
VGG11 = [64, 128, 256, 256, 512, 512, 512, 512]
VGG11_CONV_AT = [0, 4, 8, 11, 15, 18, 22, 25]
VGG11_POOL_AFTER = {0: 3, 1: 7, 3: 14, 5: 21, 7: 28}


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock, with its parameter names."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        s = x if self.downsample is None else self.downsample(x)
        return F.relu(y + s)


class ResNet18(nn.Module):
    """torchvision's resnet18 up to layer4; `small` is sid's stem for inputs up to 64 px
    (3×3 stride 1, no max-pool)."""

    def __init__(self, in_channels: int, small: bool):
        super().__init__()
        if small:
            self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.small = small
        cin = 64
        for i, cout in enumerate([64, 128, 256, 512]):
            stride = 1 if i == 0 else 2
            layer = nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1))
            setattr(self, f"layer{i + 1}", layer)
            cin = cout

    def block_fns(self):
        def stem(x):
            y = F.relu(self.bn1(self.conv1(x)))
            return y if self.small else F.max_pool2d(y, 3, 2, 1)

        out = [stem]
        for i in range(4):
            out.extend(getattr(self, f"layer{i + 1}"))
        return out


class _VggBlock:
    def __init__(self, conv, bn, pool):
        self.conv, self.bn, self.pool = conv, bn, pool

    def __call__(self, x):
        y = F.relu(self.bn(self.conv(x)))
        return F.max_pool2d(y, 2) if self.pool else y


class Vgg11Bn(nn.Module):
    """torchvision's vgg11_bn `features`, with its indices; `pools[i]`: whether block i
    ends with a max-pool (sid skips one that would leave less than 1×1)."""

    def __init__(self, in_channels: int, pools):
        super().__init__()
        layers, cin = [], in_channels
        for i, cout in enumerate(VGG11):
            layers += [nn.Conv2d(cin, cout, 3, 1, 1), nn.BatchNorm2d(cout), nn.ReLU()]
            if i in VGG11_POOL_AFTER:
                layers.append(nn.MaxPool2d(2, 2))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.pools = list(pools)

    def block_fns(self):
        f = self.features
        return [_VggBlock(f[at], f[at + 1], self.pools[i]) for i, at in enumerate(VGG11_CONV_AT)]


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class EncoderBlock(nn.Module):
    """timm's pre-norm ViT block, with its names."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width, 4 * width)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, in_channels: int, width: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, width, patch, patch)


class VitTiny(nn.Module):
    """timm's vit_tiny_patch16_224 layout at `image_size` and `patch`; `norm` is the final
    LayerNorm (sid applies it to the class token in its head)."""

    def __init__(self, in_channels: int, image_size: int, patch: int, width=192, depth=12, heads=3):
        super().__init__()
        tokens = (image_size // patch) ** 2
        self.patch_embed = PatchEmbed(in_channels, width, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens + 1, width))
        self.blocks = nn.ModuleList(EncoderBlock(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def block_fns(self):
        def embed(x):
            t = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
            return torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], 1) + self.pos_embed

        return [embed, *self.blocks]


class SimpleCnn(nn.Module):
    """sid's SimpleCNN (no reference layout): its names are sid's own."""

    def __init__(self, in_channels: int):
        super().__init__()
        chans = [(in_channels, 32), (32, 64), (64, 128), (128, 128)]
        for i, (a, b) in enumerate(chans):
            setattr(self, f"conv{i + 1}", nn.Conv2d(a, b, 3, 1, 1))

    def block_fns(self):
        def block(i):
            conv = getattr(self, f"conv{i + 1}")
            return lambda x: F.max_pool2d(F.relu(conv(x)), 2) if i in (1, 3) else F.relu(conv(x))

        return [block(i) for i in range(4)]


class MlpBackbone(nn.Module):
    """sid's MLP backbone (no reference layout): flatten, linear 512, ReLU."""

    def __init__(self, inputs: int):
        super().__init__()
        self.fc1 = nn.Linear(inputs, 512)

    def block_fns(self):
        return [lambda x: F.relu(self.fc1(x.flatten(1)))]


class Neck(nn.Module):
    """Pool (images: spatial mean; tokens: the class token, layer-normalised) → linear to d."""

    def __init__(self, width: int, d: int, tokens: bool, norm=None):
        super().__init__()
        self.fc = nn.Linear(width, d)
        if tokens and norm is None:
            self.norm = nn.LayerNorm(width, eps=1e-6)
        # The last ViT neck's norm is the backbone's (timm's `norm`): held, not registered.
        self._shared_norm = [norm]

    def forward(self, h):
        if h.dim() == 4:
            h = h.mean((2, 3))
        elif h.dim() == 3:
            h = h[:, 0]
            h = self.norm(h) if hasattr(self, "norm") else self._shared_norm[0](h)
        return self.fc(h)


class BeliefModule(nn.Module):
    """linear(N + d → hidden) → ReLU → linear(hidden → N) on [p_prev, z]."""

    def __init__(self, n: int, d: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(n + d, hidden)
        self.fc2 = nn.Linear(hidden, n)

    def forward(self, p, z):
        return self.fc2(F.relu(self.fc1(torch.cat([p, z], 1))))


def _block_width(meta, blocks_end: int) -> tuple[int, bool]:
    """Width of the output of blocks `0..blocks_end` and whether it is a token sequence."""
    kind = meta["backbone"]
    if kind == "vit-tiny":
        return 192, True
    if kind == "resnet18":
        return [64, 64, 64, 128, 128, 256, 256, 512, 512][blocks_end - 1], False
    if kind == "vgg11":
        return VGG11[blocks_end - 1], False
    if kind == "cnn":
        return [32, 64, 128, 128][blocks_end - 1], False
    return 512, False


class SidModel(nn.Module):
    """The exported network: `backbone` (reference names), `sid` (necks and modules)."""

    def __init__(self, meta: dict):
        super().__init__()
        if meta.get("format") != FORMAT:
            raise ValueError(f"not a sid export (format {meta.get('format')!r}, expected {FORMAT!r})")
        self.meta = meta
        c, side = meta["in_channels"], meta["image_size"]
        kind = meta["backbone"]
        if kind == "resnet18":
            self.backbone = ResNet18(c, meta["resnet_stem"] == "small")
        elif kind == "vgg11":
            self.backbone = Vgg11Bn(c, meta["vgg_pools"])
        elif kind == "vit-tiny":
            self.backbone = VitTiny(c, side, meta["vit_patch"])
        elif kind == "cnn":
            self.backbone = SimpleCnn(c)
        elif kind == "mlp":
            self.backbone = MlpBackbone(c * side * side)
        else:
            raise ValueError(f"unknown backbone {kind!r}")
        n, d, h = meta["num_classes"], meta["feature_dim"], meta["module_hidden"]
        sid = nn.ModuleDict()
        necks = []
        for st in meta["stages"]:
            width, tokens = _block_width(meta, st["blocks_end"])
            path = st["neck"][len("sid."):].split(".")
            last = st is meta["stages"][-1]
            shared = self.backbone.norm if (last and kind == "vit-tiny") else None
            neck = Neck(width, d, tokens, shared)
            # The last stage's neck is the backbone's head: `sid.extractor.head` (ViT: norm
            # and fc), or its linear alone, `sid.extractor.fc` (`fc2` for the MLP); the other
            # stages' are `sid.neck_<s>`.
            if path[0] == "extractor":
                if "extractor" not in sid:
                    sid["extractor"] = nn.Module()
                setattr(sid["extractor"], path[1], neck if path[1] == "head" else neck.fc)
            else:
                sid[path[0]] = neck
            necks.append(neck)
        if kind in ("cnn", "mlp"):
            # No reference layout: the backbone's parameters are sid.extractor.* too.
            if "extractor" not in sid:
                sid["extractor"] = nn.Module()
            for name, m in self.backbone.named_children():
                setattr(sid["extractor"], name, m)
        for i in range(meta["modules"]):
            sid[f"module_{i + 1}"] = BeliefModule(n, d, h)
        self.sid = sid
        self._necks = necks

    @classmethod
    def load(cls, path: str, device="cpu") -> "SidModel":
        """The network of an exported file, in eval mode, on `device`."""
        with safe_open(path, "pt") as f:
            meta = json.loads((f.metadata() or {}).get("sid", "{}"))
        model = cls(meta)
        tensors = load_file(path)
        state, used = {}, set()
        for k in model.state_dict():
            src = k
            if k.startswith("backbone."):
                src = k[len("backbone."):]
                if src not in tensors:
                    src = "sid.extractor." + src
            if src in tensors:
                state[k] = tensors[src]
                used.add(src)
        left = sorted(set(tensors) - used)
        if left:
            raise ValueError(f"{path}: names this model has no place for: {', '.join(left[:6])}")
        model.load_state_dict(state, strict=True)
        return model.to(device).eval()

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] in 0..1 at the run's size, normalised as its training data."""
        mean = torch.tensor(self.meta["mean"], device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.meta["std"], device=images.device).view(1, -1, 1, 1)
        return (images - mean) / std

    def _stage_modules(self, s):
        a, b = self.meta["stages"][s]["modules"]
        return [self.sid[f"module_{i + 1}"] for i in range(a, b)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every module's logits [B, N], first to last: the full cascade."""
        blocks = self.backbone.block_fns()
        n = self.meta["num_classes"]
        p = torch.full((x.shape[0], n), 1.0 / n, device=x.device)
        h, done, logits = x, 0, []
        for s, st in enumerate(self.meta["stages"]):
            for blk in blocks[done:st["blocks_end"]]:
                h = blk(h)
            done = st["blocks_end"]
            z = self._necks[s](h)
            for m in self._stage_modules(s):
                logit = m(p, z)
                p = logit.softmax(-1)
                logits.append(logit)
        return logits

    @torch.no_grad()
    def predict(self, x: torch.Tensor, tau: float | None = 0.9):
        """Early exit: each sample leaves at the first module whose belief's top probability
        reaches `tau` (the last module takes the rest; `tau=None`: the last module for all),
        and later blocks and modules run for the samples still in the cascade only.
        Returns (class [B], 1-based exit module [B], confidence [B])."""
        b, n = x.shape[0], self.meta["num_classes"]
        total = self.meta["modules"]
        pred = torch.zeros(b, dtype=torch.long, device=x.device)
        exit_module = torch.full((b,), total, dtype=torch.long, device=x.device)
        conf_out = torch.zeros(b, device=x.device)
        remaining = torch.arange(b, device=x.device)
        blocks = self.backbone.block_fns()
        p = torch.full((b, n), 1.0 / n, device=x.device)
        h, done, k = x, 0, 0
        for s, st in enumerate(self.meta["stages"]):
            for blk in blocks[done:st["blocks_end"]]:
                h = blk(h)
            done = st["blocks_end"]
            z = self._necks[s](h)
            for m in self._stage_modules(s):
                k += 1
                logit = m(p, z)
                p = logit.softmax(-1)
                conf, cls_ = p.max(-1)
                if k == total:
                    leaves = torch.ones_like(conf, dtype=torch.bool)
                elif tau is None:
                    leaves = torch.zeros_like(conf, dtype=torch.bool)
                else:
                    leaves = conf >= tau
                at = remaining[leaves]
                pred[at], exit_module[at], conf_out[at] = cls_[leaves], k, conf[leaves]
                stay = ~leaves
                remaining, p, z, h = remaining[stay], p[stay], z[stay], h[stay]
                if remaining.numel() == 0:
                    return pred, exit_module, conf_out
        return pred, exit_module, conf_out


def main(argv):
    if len(argv) != 2:
        print("usage: python sid_model.py MODEL.safetensors", file=sys.stderr)
        return 2
    model = SidModel.load(argv[1])
    m = model.meta
    print(
        f"{m['backbone']} ({m['reference'] or 'sid names'}), {m['modules']} modules in "
        f"{len(m['stages'])} stage(s), {m['in_channels']}×{m['image_size']}² inputs, "
        f"{m['num_classes']} classes, trained with {m['method']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
