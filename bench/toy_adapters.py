"""Adapters on the toy world: LoRA, DoRA, LoHa and LoKr trained on the demo subject, with a held-out photo's val/loss.

    python bench/toy_adapters.py [--steps 120] [--seeds 0 1] [--out bench/results/cpu_toy_adapters.md]

Each row is the demo's fit (``configs/demo.yaml`` through the CLI: the pretrained toy model, prior preservation,
UNet + text encoder, the demo's rank and learning rates) for ``--steps`` steps (120 by default; the demo itself runs
``trainer.max_steps``) with ``model.adapter`` set, and ``data.holdout 1``: the last of the
five demo photos is kept out of training, and ``val/loss`` (the fixed-noise denoising loss on it) is logged at step 0,
midway and at the end. The toy metrics (DINO, CLIP-I, CLIP-T, PRES: toy encoders, see README "Toy world") are the
run's validation at the last step. One subject; the seed (``seed_everything``) varies the adapters' initialisation and
the training noise. The demo's learning rate and rank were chosen with LoRA; LoHa and LoKr (whose updates start
smaller: a product of two factors, one at zero) are also run at 4x the learning rates (4x those read from
``configs/demo.yaml`` by ``bench.common.demo_rates``), as LyCORIS' guides suggest higher rates for them.
"""

from __future__ import annotations

import csv
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import demo_config, demo_rates, toy_bench_parser, toy_fit, write_report  # noqa: E402

ADAPTERS = ("lora", "dora", "loha", "lokr")
FAST = demo_rates(4)  # 4x the demo's rates (configs/demo.yaml)
ROWS = [(a, a, ()) for a in ADAPTERS] + [("loha, 4x lr", "loha", FAST), ("lokr, 4x lr", "lokr", FAST)]
METRICS = ("dino", "clip_i", "clip_t", "pres")


def _val_losses(cli) -> dict[int, float]:
    from callbacks.run_dir import run_dir

    with open(run_dir(cli.trainer) / "metrics.csv") as f:
        return {int(r["step"]): float(r["val/loss"]) for r in csv.DictReader(f) if r.get("val/loss")}


def measure(steps: int, seeds: list[int]) -> list[dict]:
    from datamodules.toy_subject import draw_toy_subject

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subject, class_dir = tmp / "subject", tmp / "class"  # class images made by the first run, shared
        draw_toy_subject(subject, num_images=5, resolution=32, seed=0)  # the demo's photos
        for seed in seeds:
            for label, adapter, extra in ROWS:
                start = time.perf_counter()
                cli, val = toy_fit(
                    tmp / f"run_{adapter}_{seed}",
                    subject,
                    class_dir,
                    f"--seed_everything={seed}",
                    f"--model.adapter={adapter}",
                    "--data.holdout=1",
                    f"--trainer.val_check_interval={steps // 2}",
                    *extra,
                    steps=steps,
                )
                seconds = time.perf_counter() - start
                trained = sum(p.numel() for p in cli.model.parameters() if p.requires_grad)
                losses = _val_losses(cli)
                row = {"adapter": label, "seed": seed, "params": trained, "seconds": seconds}
                row |= {m: float(val[steps][f"val/{m}"]) for m in METRICS}
                row |= {"dino_before": float(val[0]["val/dino"]), "losses": [losses[s] for s in sorted(losses)]}
                row["loss_steps"] = sorted(losses)
                rows.append(row)
                print(row, flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = toy_bench_parser(__doc__, seeds=[0, 1])
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = measure(args.steps, args.seeds)
    steps = rows[0]["loss_steps"]
    demo = demo_config()["model"]
    rank, unet_lr, text_lr = demo["lora_rank"], float(demo["learning_rate"]), float(demo["text_encoder_lr"])
    lines = [
        f"The demo's fit (configs/demo.yaml: rank {rank}, alpha {rank}, learning rates {unet_lr:g} / {text_lr:g} for "
        f"UNet / text encoder, or 4x those ({4 * unet_lr:g} / {4 * text_lr:g}) where the row says so), {args.steps} "
        "steps (the demo runs more), with `model.adapter` set and one of "
        "the 5 photos held out (`data.holdout 1`). Toy metrics at the last validation (DINO, CLIP-I, CLIP-T higher is "
        "better, PRES lower); val/loss on the held-out photo at steps " + ", ".join(map(str, steps)) + " (step 0: the "
        "base model, the same for every row of a seed). params: trained weights. s: wall time of the fit with its "
        "three validations on a shared CPU (indicative).",
        "",
        "| adapter | seed | params | DINO before | DINO | CLIP-I | CLIP-T | PRES | val/loss | s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
        *(
            f"| {r['adapter']} | {r['seed']} | {r['params']:,} | {r['dino_before']:.3f} | {r['dino']:.3f} | "
            f"{r['clip_i']:.3f} | {r['clip_t']:.3f} | {r['pres']:.3f} | "
            f"{' / '.join(f'{v:.4f}' for v in r['losses'])} | {r['seconds']:.0f} |"
            for r in rows
        ),
        "",
        "Means over seeds:",
        "",
        "| adapter | DINO | CLIP-I | CLIP-T | PRES | val/loss at the end |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for adapter, _, _ in ROWS:
        mine = [r for r in rows if r["adapter"] == adapter]
        mean = {k: sum(r[k] for r in mine) / len(mine) for k in METRICS}
        end = sum(r["losses"][-1] for r in mine) / len(mine)
        lines.append(
            f"| {adapter} | {mean['dino']:.3f} | {mean['clip_i']:.3f} | {mean['clip_t']:.3f} | {mean['pres']:.3f} | "
            f"{end:.4f} |"
        )
    write_report(
        f"bench/toy_adapters.py: LoRA, DoRA, LoHa, LoKr on the demo subject, builtin:toy-sd, {args.steps} steps",
        "bench/toy_adapters.py",
        argv,
        start,
        lines,
        args.out,
    )
    return rows


if __name__ == "__main__":
    main()
