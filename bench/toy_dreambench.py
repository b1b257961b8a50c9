"""A toy DreamBench: four toy subjects, each trained as its own run, scored like the DreamBooth paper's Table 1.

    python bench/toy_dreambench.py [--steps 120] [--seeds 0 1] [--subjects ...] [--rows ...]
                                   [--out bench/results/cpu_toy_dreambench.md] [--raw rows.jsonl]

Subjects (``datamodules.toy_subject.ToyLook``, 5 photos each at the toy model's 32 px, drawn like the demo subject:
same positions, sizes and backgrounds, another ball): ``checker`` (the demo's teal-and-orange checkered ball with a
yellow star, checks as wide as the ball's radius), ``bee`` (yellow-and-black stripes, no emblem), ``berry`` (plain
purple with a white dot) and ``candy`` (red-and-white checks, no emblem). Every subject is "a sks ball"; the class
images ("a ball", made once by the base model) are shared.

Rows: ``ceiling`` (each subject's photos against each other, as ``bench/toy_ceiling.py``'s "real vs real": DINO,
CLIP-I, and DIV = 1 - their mean pairwise DINO cosine, the offline DIV's distance), ``base`` (the ``lora`` run's
validation at step 0: the base model), and one trained row per recipe: the demo's fit (``configs/demo.yaml`` through
the CLI, ``bench.common.toy_fit``: the demo's LoRA rank and learning rates on UNet + text encoder, prior
preservation; ``--steps`` steps, 120 by default, where the demo runs ``trainer.max_steps``) with that recipe switched
on. ``full`` is full UNet fine-tuning at 2e-4 (``bench/toy_effect.py``'s), ``loha 4x`` LoHa at 4x the demo's rates
(its better rate in ``bench/toy_adapters.py``), ``lokr 4x`` likewise, ``adafactor`` at the demo's rates, ``lion`` at a
third of them with beta2 0.99 and 3x the weight decay (the usual Lion settings). ``prodigy`` (learning rate 1.0, beta2
0.99) runs only when asked for (``--rows ... prodigy``): it needs ``pip install prodigyopt``. Each trained row's metrics are its run's validation at the last step
(toy DINO, CLIP-I, CLIP-T, PRES, DIV over the demo's 4 validation prompts x 2 images); mean and spread over subjects x
seeds, and each recipe's difference from ``lora`` paired by subject and seed.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import demo_rates, machine, toy_bench_parser, toy_fit, write_report  # noqa: E402
from datamodules.toy_subject import TOY_SUBJECTS  # noqa: E402

SUBJECTS = TOY_SUBJECTS  # drawn like the demo subject (datamodules.toy_subject)
FAST = demo_rates(4)  # 4x the demo's rates (configs/demo.yaml)
ROWS = {
    "lora": (),
    "full": ("--model.use_lora=false", "--model.train_text_encoder=false", "--model.learning_rate=2e-4"),
    "dora": ("--model.adapter=dora",),
    "loha 4x": ("--model.adapter=loha", *FAST),
    "snr_gamma 5": ("--model.snr_gamma=5",),
    "noise_offset 0.05": ("--model.noise_offset=0.05",),
    "input_perturbation 0.1": ("--model.input_perturbation=0.1",),
    "ema_decay 0.999": ("--model.ema_decay=0.999",),
    "new_tokens": ("--data.new_tokens=[<s0>, <s1>]", "--model.new_token_init=ball"),
    "lokr 4x": ("--model.adapter=lokr", *FAST),
    "adafactor": ("--model.optimizer=adafactor",),
    "lion": (
        "--model.optimizer=lion",
        *demo_rates(1 / 3),
        "--model.adam_beta2=0.99",
        "--model.adam_weight_decay=3e-2",
    ),
    "prodigy": (
        "--model.optimizer=prodigy",
        "--model.learning_rate=1.0",
        "--model.text_encoder_lr=1.0",
        "--model.adam_beta2=0.99",
    ),  # needs: pip install prodigyopt (not in requirements.lock)
}
DEFAULT_ROWS = tuple(row for row in ROWS if row != "prodigy")
METRICS = ("dino", "clip_i", "clip_t", "pres", "div")


def draw_subjects(root: Path, names, num_images: int = 5, resolution: int = 32) -> dict[str, Path]:
    """Each subject's photos into ``root/<name>`` (seed 0 of ``draw_toy_subject``: the demo's positions)."""
    from datamodules.toy_subject import draw_toy_subject

    folders = {}
    for name in names:
        folders[name] = root / name
        draw_toy_subject(folders[name], num_images, resolution, seed=0, look=SUBJECTS[name])
    return folders


def ceiling(folder: Path) -> dict[str, float]:
    """The subject's photos against each other (distinct pairs), scored with the toy encoders as validation does."""
    from bench.toy_ceiling import _stack, mean_similarity
    from datamodules.images import list_images, load_image
    from metrics.encoders import TOY_CLIP, TOY_DINO, load_clip, load_dino

    photos = _stack([load_image(p) for p in list_images(folder)])
    dino = load_dino(TOY_DINO)(photos)
    row = {"dino": mean_similarity(dino, dino, True)}
    clip = load_clip(TOY_CLIP)(photos)
    row["clip_i"] = mean_similarity(clip, clip, True)
    row["div"] = 1 - row["dino"]
    return row


def measure(steps: int, seeds: list[int], subjects: list[str], rows: list[str], overrides: list[str],
            raw: Path | None = None) -> list[dict]:  # fmt: skip
    """One fit per subject, seed and row; returns one dict per (row, subject, seed), ``ceiling`` and ``base`` too."""
    results = []

    def keep(result: dict) -> None:
        results.append(result)
        print(json.dumps(result), flush=True)
        if raw is not None:
            with open(raw, "a") as f:
                f.write(json.dumps(result) + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folders = draw_subjects(tmp / "subjects", subjects)
        class_dir = tmp / "class"  # made by the first fit, shared: every subject is "a ball"
        for subject in subjects:
            keep({"row": "ceiling", "subject": subject, "seed": None, **ceiling(folders[subject])})
        for seed in seeds:  # seeds outermost: a run cut short still has every subject of the first seed
            for subject in subjects:
                for row in rows:
                    baseline = () if row == "lora" else ("--trainer.num_sanity_val_steps=0",)
                    start = time.perf_counter()
                    _, val = toy_fit(tmp / f"run_{subject}_{seed}_{len(results)}", folders[subject], class_dir,
                                     f"--seed_everything={seed}", *ROWS[row], *baseline, *overrides,
                                     steps=steps)  # fmt: skip
                    seconds = time.perf_counter() - start
                    if row == "lora":
                        keep({"row": "base", "subject": subject, "seed": seed,
                              **{m: float(val[0][f"val/{m}"]) for m in METRICS}})  # fmt: skip
                    keep({"row": row, "subject": subject, "seed": seed, "seconds": seconds,
                          **{m: float(val[steps][f"val/{m}"]) for m in METRICS}})  # fmt: skip
    return results


def _spread(values: list[float]) -> str:
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {std:.3f}"


def table(results: list[dict]) -> list[str]:
    """Markdown: the Table-1 rows (mean ± std over subjects x seeds), then each recipe's paired difference from lora."""
    order = ["ceiling", "base", *dict.fromkeys(r["row"] for r in results if r["row"] not in ("ceiling", "base"))]
    lines = [
        "| row | runs | DINO | CLIP-I | CLIP-T | PRES | DIV | s per fit |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in order:
        mine = [r for r in results if r["row"] == row]
        if not mine:
            continue
        cells = [_spread([r[m] for r in mine if m in r]) for m in METRICS]
        seconds = [r["seconds"] for r in mine if "seconds" in r]
        time_cell = f"{statistics.fmean(seconds):.0f}" if seconds else ""
        lines.append(f"| {row} | {len(mine)} | " + " | ".join(cells) + f" | {time_cell} |")
    lora = {(r["subject"], r["seed"]): r for r in results if r["row"] == "lora"}
    recipes = [row for row in order if row not in ("ceiling", "base", "lora")]
    if lora and recipes:
        lines += [
            "",
            "Each row minus `lora` on the same subject and seed: mean ± std over the pairs, `*` where |mean| > std "
            "(a consistent difference; otherwise no measurable effect), and in how many pairs it is above 0:",
            "",
            "| row - lora | pairs | DINO | CLIP-I | CLIP-T | PRES (lower is better) | DIV |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row in ["base", *recipes]:
            pairs = [(r, lora[(r["subject"], r["seed"])]) for r in results
                     if r["row"] == row and (r["subject"], r["seed"]) in lora]  # fmt: skip
            cells = []
            for m in METRICS:
                diffs = [r[m] - base[m] for r, base in pairs]
                mark = ""
                if len(diffs) > 1 and abs(statistics.fmean(diffs)) > statistics.stdev(diffs):
                    mark = " *"
                above = f" ({sum(d > 0 for d in diffs)}/{len(diffs)})"
                cells.append(f"{statistics.fmean(diffs):+.3f} ± {statistics.stdev(diffs):.3f}{mark}{above}"
                             if len(diffs) > 1 else f"{diffs[0]:+.3f}" if diffs else "n/a")  # fmt: skip
            lines.append(f"| {row} | {len(pairs)} | " + " | ".join(cells) + " |")
    subjects = list(dict.fromkeys(r["subject"] for r in results))
    lines += [
        "",
        "DINO per subject (mean over seeds):",
        "",
        "| row | " + " | ".join(subjects) + " |",
        "|---|" + "---:|" * len(subjects),
    ]
    for row in order:
        cells = []
        for subject in subjects:
            values = [r["dino"] for r in results if r["row"] == row and r["subject"] == subject]
            cells.append(f"{statistics.fmean(values):.3f}" if values else "")
        if any(cells):
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> list[dict]:
    parser = toy_bench_parser(__doc__, seeds=[0, 1])  # --steps (the demo's 120), --seeds, --out
    parser.add_argument("--subjects", nargs="+", choices=list(SUBJECTS), default=list(SUBJECTS))
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(DEFAULT_ROWS),
                        help="trained rows (default: all but prodigy; ceiling always, base with the lora row)")  # fmt: skip
    parser.add_argument("--override", action="append", default=[], metavar="--KEY=VALUE",
                        help="a CLI override added to every fit (repeatable; e.g. --override=--model.sampling."
                             "num_inference_steps=2 for a quick check)")  # fmt: skip
    parser.add_argument("--raw", type=Path, default=None, help="append every result as a JSON line to this file")
    args = parser.parse_args(argv)
    if "prodigy" in args.rows and importlib.util.find_spec("prodigyopt") is None:
        parser.error("--rows prodigy needs the prodigyopt package (pip install prodigyopt); leave the row out")
    start = time.perf_counter()
    load = machine()
    results = measure(args.steps, args.seeds, args.subjects, args.rows, args.override, args.raw)
    from os import getloadavg

    lines = [
        f"Subjects: {', '.join(args.subjects)} (5 photos each, 32 px); seeds: {', '.join(map(str, args.seeds))}. "
        "Toy encoders (builtin:toy-dino, builtin:toy-clip); DINO, CLIP-I, CLIP-T, DIV higher is better, PRES lower; "
        "DIV is 1 - DINO cosine among renders of a prompt. ceiling: the photos against each other (no CLIP-T, PRES); "
        "base: the base model (step 0 of the lora fits). Trained rows: the run's last validation. Mean ± std over "
        "subjects x seeds; s per fit: wall time of one fit with its validations, on a shared CPU (indicative).",
        "",
        *table(results),
    ]
    title = f"bench/toy_dreambench.py: a toy DreamBench, builtin:toy-sd, {args.steps} steps per fit"
    at_end = f"{load}, {getloadavg()[0]:.1f} at the end"
    write_report(title, "bench/toy_dreambench.py", argv, start, lines, args.out, at_end)
    return results


if __name__ == "__main__":
    main()
