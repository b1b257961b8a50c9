"""The prior-preservation ablation of the DreamBooth paper (Table 3), in miniature, on the pretrained toy model.

    python bench/prior_ablation.py [--steps 200] [--seeds 0 1] [--lora]

Each run is a real ``train.py fit --config configs/demo.yaml`` (full fine-tuning unless ``--lora``) on the demo subject,
once with the prior-preservation loss (class images of "a ball" made by the base model, weight 1) and once without.
Validation renders the subject prompts and the bare class prompt ("a ball") at step 0 (the base model) and at the end;
the table gives, at the end: DINO (subject fidelity), PRES (how close "a ball" renders came to the subject: the prior's
drift, lower is better) and DIV (diversity of the renders, higher is better). With the prior loss, PRES should rise
less and DIV fall less.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, machine  # noqa: E402

METRICS = ("val/dino", "val/clip_i", "val/pres", "val/div")


def run(workdir: Path, subject: Path, class_dir: Path, prior: bool, seed: int, args) -> dict[int, dict[str, float]]:
    out = workdir / f"{'prior' if prior else 'no_prior'}-{seed}"
    mode = ["--model.use_lora=true"] if args.lora else ["--model.use_lora=false", "--model.learning_rate=2e-4"]
    cmd = [
        sys.executable, "train.py", "fit", "--config", "configs/demo.yaml", "--seed_everything", str(seed),
        "--trainer.max_steps", str(args.steps), "--trainer.val_check_interval", str(args.steps),
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(out),
        "--trainer.default_root_dir", str(out), "--trainer.enable_progress_bar=false",
        "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]", "--export.enabled=false",
        "--model.train_text_encoder=false", f"--data.with_prior_preservation={str(prior).lower()}",
        "--data.instance_data_dir", str(subject), "--data.class_data_dir", str(class_dir), *mode,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"fit failed:\n{proc.stderr[-3000:]}")
    (metrics_csv,) = out.rglob("metrics.csv")
    with open(metrics_csv) as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/dino")]
    return {int(r["step"]): {m: float(r[m]) for m in METRICS} for r in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--lora", action="store_true", help="LoRA instead of full fine-tuning")
    args = parser.parse_args()
    from datamodules.toy_subject import draw_toy_subject

    print(f"# bench/prior_ablation.py: builtin:toy-sd, {'LoRA' if args.lora else 'full UNet'}, {args.steps} steps")
    print(f"# {machine()}, {time.strftime('%Y-%m-%d')}; mean (min-max) over seeds {args.seeds}")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        subject = workdir / "subject"
        draw_toy_subject(subject, num_images=5, resolution=32, seed=0)
        class_dir = workdir / "class"  # made by the first run with the prior, reused
        results = {True: [], False: []}
        for seed in args.seeds:
            for prior in (True, False):
                results[prior].append(run(workdir, subject, class_dir, prior, seed, args))
    print("| run | step | " + " | ".join(m.removeprefix("val/").upper() for m in METRICS) + " |")
    print("|---|---:|" + "---:|" * len(METRICS))
    for prior in (True, False):
        for step in (0, args.steps):
            cells = []
            for m in METRICS:
                values = [r[step][m] for r in results[prior]]
                cells.append(f"{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})")
            name = "with prior loss" if prior else "without prior loss"
            print(f"| {name} | {step} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
