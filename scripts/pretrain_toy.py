"""Pretrain the toy world's models: a small Stable Diffusion (VAE, CLIP text encoder, UNet) and the metric encoders.

    python -m scripts.pretrain_toy --out models/toy-world-v1 [--device cpu] [--scale 1.0]

The world is :mod:`datamodules.toy_world` at 32 px. The models are the diffusers / transformers / open_clip classes
of the real ones, sized by :mod:`sd.models.toy`. In order:

1. ``vae``: an ``AutoencoderKL`` (32 px -> 8 x 8 x 4), L1 + MSE reconstruction with a small KL term; its latent
   scaling factor is then measured as 1 / std of the latents, as SD's 0.18215 was.
2. ``unet`` + ``text_encoder``: epsilon-prediction on the SD 1.x noise schedule, trained together from scratch
   (the text encoder must learn the world's words; real SD took a pretrained CLIP), 10 % empty captions for
   classifier-free guidance.
3. ``toy_clip``: an open_clip ``CLIP`` trained contrastively on (image, caption): CLIP-I and CLIP-T.
4. ``toy_dino``: a ``ViTModel`` trained self-supervised (SimCLR: two crops / flips of one image attract, other
   images repel): the image-only DINO metric.

Everything is seeded; ``recipe.json`` (every setting, the package versions, the device) and ``train_log.csv`` (loss
and wall time) are written beside the weights, which are stored in float16 safetensors. ``--scale`` multiplies every
step count (e.g. 0.02 for a smoke test).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from datamodules.toy_world import world_arrays
from metrics.encoders import build_toy_clip, build_toy_dino
from sd.models.toy import TOY_RESOLUTION, build_toy_sd, toy_tokenizer


@dataclass
class Recipe:
    seed: int = 0
    num_images: int = 30_000
    vae_steps: int = 1_200
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 4_000
    unet_batch: int = 64
    unet_lr: float = 6e-4
    text_encoder_lr: float = 3e-4
    caption_dropout: float = 0.1
    clip_steps: int = 1_200
    clip_batch: int = 128
    clip_lr: float = 1e-3
    dino_steps: int = 1_000
    dino_batch: int = 128
    dino_lr: float = 1e-3
    dino_temperature: float = 0.2
    warmup_steps: int = 200


class Log:
    """Loss lines to stdout and rows to train_log.csv."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "w", newline="")
        self.writer = csv.writer(self.file)
        self.writer.writerow(["phase", "step", "loss", "seconds"])
        self.start = time.perf_counter()

    def every(self, phase: str, step: int, total: int, loss: torch.Tensor, interval: int = 200) -> None:
        """Log every ``interval`` steps and the last one (reading the loss only then: a sync on a GPU)."""
        if step % interval == 0 or step == total - 1:
            self(phase, step, loss.item())

    def __call__(self, phase: str, step: int, loss: float) -> None:
        elapsed = time.perf_counter() - self.start
        self.writer.writerow([phase, step, f"{loss:.5f}", f"{elapsed:.1f}"])
        self.file.flush()
        print(f"[{elapsed:7.1f} s] {phase} step {step}: loss {loss:.4f}", flush=True)


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 %."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def set_lr(optimizer: torch.optim.Optimizer, lrs: list[float]) -> None:
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr


def batches(n: int, batch: int, steps: int, generator: torch.Generator):
    """``steps`` index batches drawn from a fresh permutation each pass."""
    perm, pos = torch.randperm(n, generator=generator), 0
    for _ in range(steps):
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=generator), 0
        yield perm[pos : pos + batch]
        pos += batch


def train_vae(vae, pixels: torch.Tensor, r: Recipe, device, log: Log, g: torch.Generator) -> None:
    opt = torch.optim.AdamW(vae.parameters(), lr=r.vae_lr, weight_decay=0.0)
    vae.train()
    for step, idx in enumerate(batches(len(pixels), r.vae_batch, r.vae_steps, g)):
        set_lr(opt, [lr_at(step, r.vae_steps, r.vae_lr, r.warmup_steps)])
        x = pixels[idx].to(device)
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample(generator=None)).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + r.vae_kl_weight * dist.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.every("vae", step, r.vae_steps, loss)
    vae.eval()


@torch.no_grad()
def encode_all(vae, pixels: torch.Tensor, device, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(pixels), batch):
        dist = vae.encode(pixels[i : i + batch].to(device)).latent_dist
        means.append(dist.mean.cpu())
        stds.append(dist.std.cpu())
    return torch.cat(means), torch.cat(stds)


def train_unet(parts, latents, captions: list[str], r: Recipe, device, log: Log, g: torch.Generator) -> None:
    unet, text_encoder, tokenizer, scheduler = parts["unet"], parts["text_encoder"], parts["tokenizer"], parts["sched"]
    mean, std = latents
    tokens = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
    opt = torch.optim.AdamW(
        [
            {"params": unet.parameters(), "lr": r.unet_lr},
            {"params": text_encoder.parameters(), "lr": r.text_encoder_lr},
        ],
        weight_decay=1e-2,
    )
    alphas = scheduler.alphas_cumprod.to(device)
    unet.train()
    text_encoder.train()
    for step, idx in enumerate(batches(len(mean), r.unet_batch, r.unet_steps, g)):
        set_lr(opt, [lr_at(step, r.unet_steps, lr, r.warmup_steps) for lr in (r.unet_lr, r.text_encoder_lr)])
        m, s = mean[idx].to(device), std[idx].to(device)
        x0 = (m + s * torch.randn(m.shape, generator=g).to(device)) * parts["scaling_factor"]
        ids = tokens[idx].clone()
        drop = torch.rand(len(idx), generator=g) < r.caption_dropout
        ids[drop] = empty
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=g).to(device)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        context = text_encoder(ids.to(device))[0]
        loss = F.mse_loss(unet(noisy, t, context).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(unet.parameters()) + list(text_encoder.parameters()), 1.0)
        opt.step()
        log.every("unet", step, r.unet_steps, loss)
    unet.eval()
    text_encoder.eval()


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 4 px (padding by edge replication) and horizontal flips; colours kept."""
    n, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4), mode="replicate")
    dx = torch.randint(0, 9, (n,), generator=g)
    dy = torch.randint(0, 9, (n,), generator=g)
    out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    flip = torch.rand(n, generator=g) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def train_clip(model, images01: torch.Tensor, captions: list[str], r: Recipe, device, log: Log, g) -> None:
    import open_clip

    from metrics.encoders import ClipEncoder

    tokenize = open_clip.SimpleTokenizer(context_length=77)
    prep = ClipEncoder(model, tokenize, "toy").preprocess  # the metric's own preprocessing
    model.requires_grad_(True).train()
    opt = torch.optim.AdamW(model.parameters(), lr=r.clip_lr, weight_decay=0.1)
    caption_ids = {c: i for i, c in enumerate(sorted(set(captions)))}
    caption_of = torch.tensor([caption_ids[c] for c in captions])  # (N,) equal ids = identical captions
    for step, idx in enumerate(batches(len(images01), r.clip_batch, r.clip_steps, g)):
        set_lr(opt, [lr_at(step, r.clip_steps, r.clip_lr, r.warmup_steps)])
        pixels = prep(_augment(images01[idx], g)).to(device)
        text = tokenize([captions[i] for i in idx.tolist()]).to(device)
        img = F.normalize(model.encode_image(pixels), dim=-1)
        txt = F.normalize(model.encode_text(text), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
        # Identical captions are positives of each other (the world repeats short captions).
        ids = caption_of[idx]
        same = (ids[:, None] == ids[None, :]).to(device)  # (B, B)
        target = same.float() / same.float().sum(1, keepdim=True)
        loss = (-(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.T.log_softmax(1)).sum(1).mean()) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.every("toy_clip", step, r.clip_steps, loss)
    model.eval()


def train_dino(model, images01: torch.Tensor, r: Recipe, device, log: Log, g) -> None:
    from metrics.encoders import DinoEncoder

    prep = DinoEncoder(model, "toy", resize=TOY_RESOLUTION, crop=TOY_RESOLUTION).preprocess
    model.requires_grad_(True).train()
    width = model.config.hidden_size
    head = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU(), torch.nn.Linear(width, 64)).to(device)
    opt = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=r.dino_lr, weight_decay=0.05)
    for step, idx in enumerate(batches(len(images01), r.dino_batch, r.dino_steps, g)):
        set_lr(opt, [lr_at(step, r.dino_steps, r.dino_lr, r.warmup_steps)])
        x = images01[idx]
        views = torch.cat([prep(_augment(x, g)), prep(_augment(x, g))]).to(device)
        z = F.normalize(head(model(pixel_values=views).last_hidden_state[:, 0]), dim=-1)
        sim = z @ z.T / r.dino_temperature
        sim.fill_diagonal_(float("-inf"))
        n = len(idx)
        target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(device)
        loss = F.cross_entropy(sim, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.every("toy_dino", step, r.dino_steps, loss)
    model.eval()


def half_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(torch.float16).contiguous().cpu() for k, v in module.state_dict().items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scripts.pretrain_toy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the weights, recipe and log")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every step count (0.02: a smoke test)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    r = Recipe()
    for name in ("vae_steps", "unet_steps", "clip_steps", "dino_steps", "warmup_steps"):
        setattr(r, name, max(2, int(getattr(r, name) * args.scale)))
    if args.scale < 1:
        r.num_images = max(256, int(r.num_images * args.scale))
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    torch.manual_seed(r.seed)
    g = torch.Generator().manual_seed(r.seed)
    log = Log(out / "train_log.csv")

    started = time.perf_counter()
    arrays, captions, _ = world_arrays(r.seed, r.num_images, TOY_RESOLUTION)
    images01 = torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255  # (N, 3, 32, 32) in [0, 1]
    pixels = images01 * 2 - 1
    log("world", 0, 0.0)

    parts = build_toy_sd(seed=r.seed)
    vae, unet, text_encoder = (parts[k].to(device) for k in ("vae", "unet", "text_encoder"))
    train_vae(vae, pixels, r, device, log, g)
    latents = encode_all(vae, pixels, device)
    scaling_factor = float(1.0 / latents[0].std())
    vae.register_to_config(scaling_factor=scaling_factor)
    save_file(half_state(vae), out / "vae.safetensors")  # each phase's weights as soon as it is done
    parts["scaling_factor"] = scaling_factor
    parts["tokenizer"] = toy_tokenizer()
    train_unet(parts, latents, captions, r, device, log, g)
    save_file(half_state(unet), out / "unet.safetensors")
    save_file(half_state(text_encoder), out / "text_encoder.safetensors")

    clip = build_toy_clip(seed=r.seed).to(device)
    train_clip(clip, images01, captions, r, device, log, g)
    save_file(half_state(clip), out / "toy_clip.safetensors")
    dino = build_toy_dino(seed=r.seed).to(device)
    train_dino(dino, images01, r, device, log, g)
    save_file(half_state(dino), out / "toy_dino.safetensors")

    weights = {"unet": unet, "vae": vae, "text_encoder": text_encoder, "toy_clip": clip, "toy_dino": dino}
    versions = {}
    for pkg in ("torch", "diffusers", "transformers", "open_clip"):
        versions[pkg] = getattr(__import__(pkg), "__version__", "?")
    recipe = {
        "command": "python -m scripts.pretrain_toy " + " ".join(argv if argv is not None else sys.argv[1:]),
        "recipe": asdict(r),
        "scale": args.scale,
        "vae_scaling_factor": scaling_factor,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "cpu_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "seconds": round(time.perf_counter() - started, 1),
        "versions": versions,
        "parameters": {k: sum(p.numel() for p in m.parameters()) for k, m in weights.items()},
    }
    (out / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    print(json.dumps({k: recipe[k] for k in ("device", "seconds", "parameters")}, indent=2))


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
