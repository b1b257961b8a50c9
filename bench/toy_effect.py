"""DreamBooth's effect on the pretrained toy model, over seeds: the numbers behind tests/toy's margins.

    python bench/toy_effect.py [--steps 120] [--seeds 0 1 2]

Each run is the tests' fit (``configs/demo.yaml`` through the CLI, validation at step 0 and at the end), LoRA and full
UNet fine-tuning, one seed each; printed: toy DINO and CLIP-I of the subject-prompt renders before and after.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, toy_fit  # noqa: E402

MODES = {
    "lora": ["--model.use_lora=true"],
    "full": ["--model.use_lora=false", "--model.train_text_encoder=false", "--model.learning_rate=2e-4"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    from datamodules.toy_subject import draw_toy_subject

    print(f"# bench/toy_effect.py: builtin:toy-sd, {args.steps} steps; {machine()}, {time.strftime('%Y-%m-%d')}")
    print("| mode | seed | DINO before | DINO after | CLIP-I before | CLIP-I after |\n|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subject, class_dir = tmp / "subject", tmp / "class"
        draw_toy_subject(subject, num_images=5, resolution=32, seed=0)
        for mode, overrides in MODES.items():
            for seed in args.seeds:
                _, rows = toy_fit(tmp / f"{mode}{seed}", subject, class_dir, *overrides, f"--seed_everything={seed}",
                                  steps=args.steps)  # fmt: skip
                b, a = rows[0], rows[args.steps]
                print(f"| {mode} | {seed} | {float(b['val/dino']):.3f} | {float(a['val/dino']):.3f} | "
                      f"{float(b['val/clip_i']):.3f} | {float(a['val/clip_i']):.3f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
