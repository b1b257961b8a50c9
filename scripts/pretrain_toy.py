"""Pretrain the toy world's models: a small Stable Diffusion (VAE, CLIP text encoder, UNet) and the metric encoders.

    python -m scripts.pretrain_toy --out <folder> [--device cuda] [--phases vae unet clip dino] [--set name=value ...]

The world is :mod:`datamodules.toy_world` at 32 px (world 2: objects with uncaptioned patterns, ``pattern_prob``).
The models are the diffusers / transformers / open_clip classes of the real ones, sized by
:mod:`sd.models.toy` (``WORLDS``). The phases, in order:

1. ``vae``: an ``AutoencoderKL`` (32 px -> 8 x 8 x 4), L1 + MSE reconstruction with a small KL term, on the world's
   images and as many again ``vae_free_fraction`` free-colour ones (any colours, patterns and emblems: an
   autoencoder for more than the captioned world, as SD's is); then, and in every ``unet`` phase, the latent scaling
   factor is measured on it as 1 / std of the world's latents, as SD's 0.18215 was.
2. ``unet`` + ``text_encoder``: epsilon-prediction on the SD 1.x noise schedule, trained together from scratch
   (the text encoder must learn the world's words; real SD took a pretrained CLIP), 10 % empty captions for
   classifier-free guidance.
3. ``toy_clip``: an open_clip ``CLIP`` trained contrastively on (image, caption): CLIP-I and CLIP-T.
4. ``toy_dino``: a ``ViTModel`` trained self-supervised (SimCLR: two crops / flips of one image attract, other
   images repel): the image-only DINO metric.

Everything is seeded, each phase from its own stream; ``recipe.json`` (every setting, the package versions, each
phase's device and seconds, the commands) and ``train_log.csv`` (loss and wall time) are written beside the weights,
which are stored in float16 safetensors, each phase's as soon as it ends. ``--phases`` runs some phases and reads the
others' weights from ``--out`` (an earlier run there, whose settings for them must be the same): the phases may run
at different times or on different machines. ``--scale`` multiplies every step count (e.g. 0.02 for a smoke test).
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
from sd.models.toy import TOY_RESOLUTION, build_toy_sd, load_weights, toy_tokenizer


@dataclass
class Recipe:
    """World 2's settings, a GPU recipe (the output's recipe.json records them and each phase's machine). The shipped
    models/toy-world-v1 were made by an earlier version of this script (their recipe.json)."""

    seed: int = 0
    world: int = 2  # the models' sizes: sd.models.toy.WORLDS
    num_images: int = 60_000
    pattern_prob: float = 0.5  # world objects with an (uncaptioned) pattern in a second colour
    vae_free_fraction: float = 0.5  # the VAE also sees this many free-colour images per world image
    vae_steps: int = 5_000
    vae_batch: int = 128
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 12_000
    unet_batch: int = 256
    unet_lr: float = 6e-4
    text_encoder_lr: float = 3e-4
    caption_dropout: float = 0.1
    clip_steps: int = 3_000
    clip_batch: int = 256
    clip_lr: float = 1e-3
    dino_steps: int = 3_000
    dino_batch: int = 256
    dino_lr: float = 1e-3
    dino_temperature: float = 0.2
    warmup_steps: int = 300


class Log:
    """Loss lines to stdout and rows to train_log.csv."""

    def __init__(self, path: Path, append: bool = False) -> None:
        new = not (append and path.is_file())
        self.file = open(path, "w" if new else "a", newline="")
        self.writer = csv.writer(self.file)
        if new:
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


PHASES = ("vae", "unet", "clip", "dino")


def phase_of(field: str) -> str | None:
    """The phase a recipe setting belongs to (``None``: the world's, shared by all)."""
    if field in ("text_encoder_lr", "caption_dropout"):
        return "unet"
    prefix = field.split("_")[0]
    return prefix if prefix in PHASES else None


def apply_overrides(r: Recipe, pairs: list[str]) -> Recipe:
    """``name=value`` settings of the recipe (e.g. ``unet_steps=500``), typed as the field is."""
    fields = asdict(r)
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in fields or not value:
            raise SystemExit(f"error: --set {pair!r}: expected name=value with a name of {sorted(fields)}")
        setattr(r, name, type(fields[name])(value))
    return r


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scripts.pretrain_toy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the weights, recipe and log")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every step count (0.02: a smoke test)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--processes", type=int, default=1, help="processes drawing the world (the same images)")
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES),
                        help="the phases to run (default all); the others' weights are read from --out, made there "
                             "by an earlier run of the same recipe (e.g. --phases vae, then --phases unet clip dino)")  # fmt: skip
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="NAME=VALUE", help="recipe settings, e.g. unet_steps=500"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    r = apply_overrides(Recipe(), args.set)
    for name in ("vae_steps", "unet_steps", "clip_steps", "dino_steps", "warmup_steps"):
        setattr(r, name, max(2, int(getattr(r, name) * args.scale)))
    if args.scale < 1:
        r.num_images = max(256, int(r.num_images * args.scale))
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    phases = [p for p in PHASES if p in args.phases]
    resumed = phases != list(PHASES)
    recipe_file = out / "recipe.json"
    previous = json.loads(recipe_file.read_text()) if resumed and recipe_file.is_file() else {}
    if "vae" not in phases and not previous:
        raise SystemExit(f"error: --phases {' '.join(phases)} continues a pretraining, but {recipe_file} is missing: "
                         "run --phases vae (and the others) there first.")  # fmt: skip
    kept = [p for p in PHASES if p not in phases]  # their weights come from the earlier run: so must their settings
    changed = [
        k for k, v in asdict(r).items() if phase_of(k) in [None, *kept] and previous.get("recipe", {}).get(k, v) != v
    ]
    if changed:
        raise SystemExit(f"error: {recipe_file} was made with other {', '.join(changed)}: the weights of "
                         f"{', '.join(kept)} kept from it would not be what the recipe says.")  # fmt: skip
    device = torch.device(args.device)
    torch.manual_seed(r.seed)
    log = Log(out / "train_log.csv", append=resumed)

    def generator(phase: str) -> torch.Generator:  # one stream per phase: a phase does not depend on the others
        return torch.Generator().manual_seed(r.seed * 100 + PHASES.index(phase))

    arrays, captions, _ = world_arrays(
        r.seed, r.num_images, TOY_RESOLUTION, pattern_prob=r.pattern_prob, processes=args.processes
    )
    images01 = torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255  # (N, 3, 32, 32) in [0, 1]
    pixels = images01 * 2 - 1
    log("world", 0, 0.0)

    parts = build_toy_sd(seed=r.seed, world=r.world)
    vae, unet, text_encoder = (parts[k].to(device) for k in ("vae", "unet", "text_encoder"))
    seconds = dict(previous.get("phase_seconds", {}))
    devices = dict(previous.get("phase_devices", {}))
    device_name = str(device) if device.type == "cpu" else torch.cuda.get_device_name(device)

    def done(phase: str, started: float) -> None:
        seconds[phase] = round(time.perf_counter() - started, 1)
        devices[phase] = device_name

    if "vae" in phases:
        started = time.perf_counter()
        free, _, _ = world_arrays(r.seed + 1, int(r.num_images * r.vae_free_fraction), TOY_RESOLUTION,
                                  free_colours=True, processes=args.processes)  # fmt: skip
        vae_pixels = torch.cat([pixels, torch.from_numpy(free).permute(0, 3, 1, 2).float() / 127.5 - 1])
        train_vae(vae, vae_pixels, r, device, log, generator("vae"))
        save_file(half_state(vae), out / "vae.safetensors")  # each phase's weights as soon as it is done
        done("vae", started)
    else:  # an earlier run's VAE
        load_weights(vae, "vae", out)
        vae.eval()
    scaling_factor = previous.get("vae_scaling_factor")
    if {"vae", "unet"} & set(phases) or scaling_factor is None:
        # The latents' scale, measured as SD's 0.18215 was (1 / their std), on the VAE the UNet learns from.
        latents = encode_all(vae, pixels, device)
        scaling_factor = float(1.0 / latents[0].std())
    if "unet" in phases:
        started = time.perf_counter()
        parts["scaling_factor"] = scaling_factor
        parts["tokenizer"] = toy_tokenizer()
        train_unet(parts, latents, captions, r, device, log, generator("unet"))
        save_file(half_state(unet), out / "unet.safetensors")
        save_file(half_state(text_encoder), out / "text_encoder.safetensors")
        done("unet", started)
    if "clip" in phases:
        started = time.perf_counter()
        clip = build_toy_clip(seed=r.seed).to(device)
        train_clip(clip, images01, captions, r, device, log, generator("clip"))
        save_file(half_state(clip), out / "toy_clip.safetensors")
        done("clip", started)
    if "dino" in phases:
        started = time.perf_counter()
        dino = build_toy_dino(seed=r.seed).to(device)
        train_dino(dino, images01, r, device, log, generator("dino"))
        save_file(half_state(dino), out / "toy_dino.safetensors")
        done("dino", started)

    versions = {}
    for pkg in ("torch", "diffusers", "transformers", "open_clip"):
        versions[pkg] = getattr(__import__(pkg), "__version__", "?")
    builders = {"unet": lambda: parts["unet"], "vae": lambda: parts["vae"], "text_encoder": lambda: parts["text_encoder"],
                "toy_clip": build_toy_clip, "toy_dino": build_toy_dino}  # fmt: skip
    commands = list(previous.get("commands", [])) if resumed else []
    commands.append("python -m scripts.pretrain_toy " + " ".join(argv if argv is not None else sys.argv[1:]))
    recipe = {
        "commands": commands,
        "world": r.world,
        "recipe": asdict(r),
        "scale": args.scale,
        "vae_scaling_factor": scaling_factor,
        "phase_devices": devices,
        "phase_seconds": seconds,
        "cpu_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "seconds": round(sum(seconds.values()), 1),
        "versions": versions,
        "parameters": {k: sum(p.numel() for p in build().parameters()) for k, build in builders.items()},
    }
    (out / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    print(json.dumps({k: recipe[k] for k in ("phase_devices", "phase_seconds", "parameters")}, indent=2))


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
