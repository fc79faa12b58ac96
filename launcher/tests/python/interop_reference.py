"""The Python side of launcher/tests/interop.rs: real torchvision / timm models with random
weights, the project's python/sid_model.py, TensorBoard's own event reader.

    features KIND CHANNELS SIDE OUT_DIR   reference weights + an input and its features
    pickle OUT                            a state_dict saved with torch.save
    roundtrip MODEL IO TAU OUT_JSON       sid_model.py's logits and early exit on IO's inputs
    events DIR OUT_JSON                   every scalar of the event files in DIR
"""

import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file


def randomize_norms(model):
    """BatchNorm and LayerNorm parameters and running statistics away from their defaults,
    so that a name mapped to the wrong variable, or eval mode mistaken for train mode, shows."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def reference(kind, side):
    """The reference model sid's `kind` at `side` px loads (three input channels)."""
    if kind == "resnet18":
        import torchvision

        m = torchvision.models.resnet18(num_classes=10)
        if side <= 64:
            # sid's stem for small inputs: 3×3 stride 1, no max-pool (the usual CIFAR change).
            m.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            m.maxpool = torch.nn.Identity()

        def feats(x):
            x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
            return m.layer4(m.layer3(m.layer2(m.layer1(x))))

        return m, feats, None
    if kind == "vgg11":
        import torchvision

        m = torchvision.models.vgg11_bn(num_classes=10)
        return m, m.features, None
    if kind == "vit-tiny":
        import timm

        patch = {28: 4, 32: 4, 64: 8, 224: 16}[side]
        m = timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, img_size=side, patch_size=patch, num_classes=10
        )
        with torch.no_grad():
            # Small embeddings: tokens of variance ~1e-5, where LayerNorm's ε (timm's 1e-6)
            # shows; at unit variance a wrong ε would hide below float tolerance.
            m.cls_token.normal_(0, 3e-3)
            m.pos_embed.mul_(0.1)
            m.patch_embed.proj.weight.mul_(0.02)
            m.patch_embed.proj.bias.normal_(0, 3e-3)

        def feats(x):
            x = m.norm_pre(m._pos_embed(m.patch_embed(x)))
            return m.blocks(x)

        return m, feats, lambda h: m.norm(h)
    raise SystemExit(f"unknown kind {kind}")


def features(kind, channels, side, out):
    torch.manual_seed(0)
    m, feats, head_norm = reference(kind, side)
    randomize_norms(m)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, os.path.join(out, "weights.safetensors"))
    x = torch.randn(4, channels, side, side)
    # A grey image is the reference's RGB input with the same values in every channel.
    rgb = x.repeat(1, 3, 1, 1) if channels == 1 else x
    io = {"x": x}
    with torch.no_grad():
        m.eval()
        io["eval"] = feats(rgb).contiguous()
        if head_norm is not None:
            io["eval_normed"] = head_norm(io["eval"]).contiguous()
        m.train()
        io["train"] = feats(rgb).contiguous()
        if head_norm is not None:
            io["train_normed"] = head_norm(io["train"]).contiguous()
    save_file(io, os.path.join(out, "io.safetensors"))


def pickle(out):
    torch.save({"conv1.weight": torch.zeros(64, 3, 3, 3)}, out)


def roundtrip(model_path, io_path, tau, out):
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.join(here, "..", "..", "..", "python"))
    from sid_model import SidModel

    model = SidModel.load(model_path)
    io = load_file(io_path)
    x, y = io["x"], io["y"]
    with torch.no_grad():
        logits = model(x)
    diffs = [float((logits[i] - io[f"logits_{i}"]).abs().max()) for i in range(len(logits))]
    scale = max(float(io[f"logits_{i}"].abs().max()) for i in range(len(logits)))
    full = float((logits[-1].argmax(-1) == y).float().mean())
    pred, exit_module, conf = model.predict(x, tau)
    early = float((pred == y).float().mean())
    json.dump(
        {
            "modules": len(logits),
            "max_logit_diff": max(diffs),
            "logit_scale": scale,
            "full_accuracy": full,
            "early_accuracy": early,
            "early_mean_modules": float(exit_module.float().mean()),
        },
        open(out, "w"),
    )


def events(logdir, out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(logdir, size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    json.dump({t: [[e.step, e.value] for e in acc.Scalars(t)] for t in tags}, open(out, "w"))


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "features":
        features(args[0], int(args[1]), int(args[2]), args[3])
    elif cmd == "pickle":
        pickle(args[0])
    elif cmd == "roundtrip":
        roundtrip(args[0], args[1], float(args[2]), args[3])
    elif cmd == "events":
        events(args[0], args[1])
    else:
        raise SystemExit(f"unknown command {cmd}")
