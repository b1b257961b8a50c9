"""DreamBooth's effect on the pretrained toy model, over seeds: the numbers behind tests/toy's margins and the demo's.

    python bench/toy_effect.py [--steps N] [--seeds 0 1 2] [--out bench/results/cpu_toy_effect.md]

Each run is ``configs/demo.yaml`` as shipped through the CLI (its steps unless ``--steps``; validation at step 0 and at
the end), LoRA (the demo) and full UNet fine-tuning (at 2e-4), one seed each. Printed: toy DINO and CLIP-I of the
subject-prompt renders before and after, and the DINO after as a share of the subject's photos against each other
(the ceiling: ``bench/toy_ceiling.py``'s real-vs-real row, by ``bench.toy_dreambench.ceiling``). Issue 15 asks the
demo's LoRA for at least 60 % of it on every seed.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import demo_steps, machine, toy_bench_parser, toy_fit  # noqa: E402
from bench.toy_dreambench import ceiling  # noqa: E402

MODES = {
    "lora": ["--model.use_lora=true"],
    "full": ["--model.use_lora=false", "--model.train_text_encoder=false", "--model.learning_rate=2e-4"],
}


def main() -> None:
    parser = toy_bench_parser(__doc__, steps=demo_steps(), seeds=[0, 1, 2])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    args = parser.parse_args()
    from datamodules.toy_subject import draw_toy_subject

    start = time.perf_counter()
    head = f"# bench/toy_effect.py: configs/demo.yaml on builtin:toy-sd, {args.steps} steps"
    lines = [head, "", f"{machine()}, {time.strftime('%Y-%m-%d')}. Command: `python {' '.join(sys.argv)}`", ""]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subject, class_dir = tmp / "subject", tmp / "class"
        draw_toy_subject(subject, num_images=5, resolution=32, seed=0)
        real = ceiling(subject)["dino"]  # the real-vs-real row
        table = [
            f"Ceiling: the subject's 5 photos against each other, toy DINO {real:.3f}.",
            "",
            "| mode | seed | DINO before | DINO after | DINO after / ceiling | CLIP-I before | CLIP-I after |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        print("\n".join(table), flush=True)
        for mode in args.modes:
            for seed in args.seeds:
                _, rows = toy_fit(tmp / f"{mode}{seed}", subject, class_dir, *MODES[mode], f"--seed_everything={seed}",
                                  steps=args.steps)  # fmt: skip
                b, a = rows[0], rows[args.steps]
                dino = float(a["val/dino"])
                row = (f"| {mode} | {seed} | {float(b['val/dino']):.3f} | {dino:.3f} | {dino / real:.0%} | "
                       f"{float(b['val/clip_i']):.3f} | {float(a['val/clip_i']):.3f} |")  # fmt: skip
                table.append(row)
                print(row, flush=True)
    lines += [*table, "", f"{time.perf_counter() - start:.0f} s in all."]
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
