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
import floor: the weights are file pages, not a copy.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, machine  # noqa: E402

CHILD = """
import json, sys, torch
from diffusers import UNet2DConditionModel
from lightning_modules.builtin_models import resolve_pretrained
from lightning_modules.memory import cast_frozen_
from lightning_modules.sd_loading import load_part
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
    args = parser.parse_args()
    from lightning_modules.builtin_models import resolve_pretrained

    resolve_pretrained(args.model)  # built once before measuring
    print(f"# bench/load_memory.py: the UNet of {args.model}, each way in a fresh process")
    print(f"# {machine()}, {time.strftime('%Y-%m-%d')}; GB = 10^9 bytes")
    print("| way | peak RSS (GB) | RSS after (GB) | anonymous after (GB) | file pages after (GB) |")
    print("|---|---:|---:|---:|---:|")
    for name, way in WAYS.items():
        out = subprocess.run(
            [sys.executable, "-c", CHILD, way, args.model], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
        r = json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:])
        cells = " | ".join(f"{r[k] / 1e9:.2f}" for k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"))
        print(f"| {name} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
