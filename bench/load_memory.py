"""Loading memory: the peak resident memory of loading a base model's UNet, each way in a fresh process.

    python bench/load_memory.py [--model builtin:sd15-random]

Ways (the peak is the process's ``VmHWM``, imports included; the import-only row is the floor):

- ``imports only``: torch, diffusers and the project's loader, nothing loaded;
- ``float32, as training loads it``: ``load_part(model, "unet")`` (diffusers maps the safetensors file; no copy);
- ``bf16, as training holds frozen weights``: the above, then ``cast_frozen_`` (one weight at a time, each weight's
  file pages dropped once its bf16 copy exists): what a LoRA run under ``bf16-mixed`` does;
- ``bf16 through diffusers' torch_dtype``: ``UNet2DConditionModel.from_pretrained(..., torch_dtype=torch.bfloat16)``,
  for comparison.

Whether a float32 load makes a transient copy shows as the float32 row's anonymous (non-file) memory staying at the
import floor: the weights are file pages, not a copy. ``--jobs N`` runs up to N of the ways' processes at once (each
peak is its own process's; the default, 1, keeps the machine's memory to one load at a time).

    python bench/load_memory.py --ranks 2 [--model builtin:sd15-random]

Host memory per rank of a multi-process full fine-tune (DDP, FSDP, DeepSpeed): ``--ranks`` processes at once each
load the UNet as ``configure_model`` does for full fine-tuning (float32, trained) and then read every weight once, as
FSDP does when it moves each unit to its GPU. Measured in each process while all are alive (``/proc/self/smaps_rollup``):
its private memory (what it alone holds) and its proportional share (PSS: shared pages divided among the processes
that map them), from a diffusers folder (the weights file mapped by every rank: one copy in the page cache, shared)
and from a single ``.safetensors`` file (converted to the diffusers layout in each rank: a private copy each).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, machine  # noqa: E402

CHILD = """
import json, sys, torch
from diffusers import UNet2DConditionModel
from sd.models.builtin import resolve_pretrained
from lightning_modules.memory import cast_frozen_
from sd.models.loading import load_part
way, model = sys.argv[1], sys.argv[2]
if way == "float32":
    unet = load_part(model, "unet").requires_grad_(False)
elif way == "bf16-cast":
    unet = load_part(model, "unet").requires_grad_(False)
    cast_frozen_(unet, torch.bfloat16)
elif way == "bf16-diffusers":
    unet = UNet2DConditionModel.from_pretrained(resolve_pretrained(model), subfolder="unet", torch_dtype=torch.bfloat16)
status = {l.split(":")[0]: int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.split(":")[0] in
          ("VmHWM", "VmRSS", "RssAnon", "RssFile")}
print("RESULT " + json.dumps(status))
"""

WAYS = {
    "imports only": "imports",
    "float32, as training loads it (load_part)": "float32",
    "bf16, as training holds frozen weights (load_part + cast_frozen_)": "bf16-cast",
    "bf16 through diffusers' torch_dtype": "bf16-diffusers",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:sd15-random")
    parser.add_argument("--ranks", type=int, default=0, help="measure N processes loading at once (see above)")
    parser.add_argument("--jobs", type=int, default=1, help="ways measured at once, each in its own process")
    args = parser.parse_args()
    from sd.models.builtin import resolve_pretrained

    resolve_pretrained(args.model)  # built once before measuring
    if args.ranks:
        return measure_ranks(args.model, args.ranks)
    print(f"# bench/load_memory.py: the UNet of {args.model}, each way in a fresh process")
    print(f"# {machine()}, {time.strftime('%Y-%m-%d')}; GB = 10^9 bytes")
    print("| way | peak RSS (GB) | RSS after (GB) | anonymous after (GB) | file pages after (GB) |")
    print("|---|---:|---:|---:|---:|")

    def measure(way: str) -> dict:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, way, args.model], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
        return json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:])

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for name, r in zip(WAYS, pool.map(measure, WAYS.values()), strict=True):  # in order, each as it finishes
            cells = " | ".join(f"{r[k] / 1e9:.2f}" for k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"))
            print(f"| {name} | {cells} |", flush=True)


RANK_CHILD = """
import json, sys, torch
from sd.models.loading import load_part
unet = load_part(sys.argv[1], "unet", single_file_config=sys.argv[2]).requires_grad_(True)  # full fine-tuning
with torch.no_grad():
    total = sum(float(p.detach().sum()) for p in unet.parameters())  # every weight read once, as FSDP moves units
print("READY", flush=True)
sys.stdin.readline()  # measured while every rank holds its model
rollup = {l.split(":")[0]: int(l.split()[1]) * 1024 for l in open("/proc/self/smaps_rollup") if l.endswith("kB\\n")}
status = {l.split(":")[0]: int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")}
print("RESULT " + json.dumps({**rollup, **status}), flush=True)
sys.stdin.readline()  # held until every rank has measured
"""


def _load_at_once(source: str, config: str, ranks: int) -> list[dict]:
    """``ranks`` processes load ``source``'s UNet together; each one's memory, measured while all hold it."""
    children = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_CHILD, source, config], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True,
        )
        for _ in range(ranks)
    ]  # fmt: skip
    for child in children:
        while (line := child.stdout.readline()) and not line.startswith("READY"):
            pass
        if not line:
            raise RuntimeError(f"a process loading {source} ended early (exit status {child.wait()})")
    for child in children:
        child.stdin.write("measure\n")
        child.stdin.flush()
    results = []
    for child in children:
        while (line := child.stdout.readline()) and not line.startswith("RESULT "):
            pass
        results.append(json.loads(line[7:]))
    for child in children:  # every rank measured while all held their model: now they may end
        child.communicate("end\n")
    return results


def measure_ranks(model: str, ranks: int) -> None:
    import tempfile

    from sd.models.loading import load_pipeline
    from sd.models.single_file import save_single_file

    print(f"# bench/load_memory.py --ranks {ranks}: the UNet of {model}, loaded by {ranks} processes at once, each")
    print("# reading every weight once (full fine-tuning: float32, trained); measured while all hold it")
    print(f"# {machine()}, {time.strftime('%Y-%m-%d')}; GB = 10^9 bytes; per process: mean over the {ranks}")
    print("| base model given as | private (GB) | PSS (GB) | RSS (GB) | peak RSS (GB) | host total, PSS x ranks (GB) |")
    print("|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        single = save_single_file(load_pipeline(model), Path(tmp) / "model.safetensors")
        for name, source in (("a diffusers folder", model), ("one .safetensors file (original layout)", str(single))):
            rows = _load_at_once(source, model, ranks)  # the single file described by the model's own configs

            def mean(key: str, rows: list[dict] = rows) -> float:
                return sum(r[key] for r in rows) / len(rows) / 1e9

            private = mean("Private_Clean") + mean("Private_Dirty")
            cells = f"{private:.2f} | {mean('Pss'):.2f} | {mean('Rss'):.2f} | {mean('VmHWM'):.2f} | "
            print(f"| {name} | {cells}{mean('Pss') * ranks:.2f} |", flush=True)


if __name__ == "__main__":
    main()
