"""What a render was made with, in the PNG itself, the way AUTOMATIC1111 writes it ("infotext"). Lightning-free.

The ``parameters`` text chunk holds the prompt, then ``Negative prompt: ...``, then one line of ``Key: value`` pairs::

    a photo of sks dog on the beach
    Negative prompt: blurry
    Steps: 25, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 3000, Size: 512x512, Model: "stable-diffusion-v1-5/...", ...

AUTOMATIC1111's "PNG Info" tab, ComfyUI and most image viewers for SD users read it; values that hold a comma, a colon
or a line break are JSON-quoted, as AUTOMATIC1111 does. A second chunk, ``dreambooth_lightning``, holds the same as JSON.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from core.safe_files import atomic_write

PARAMETERS_KEY = "parameters"
JSON_KEY = "dreambooth_lightning"
# Our sampler names -> AUTOMATIC1111's (PNDM as SD 1.x configures it, skip_prk_steps, is PLMS).
A1111_SAMPLERS = {"ddim": "DDIM", "dpm++": "DPM++ 2M", "euler_a": "Euler a", "pndm": "PLMS"}
_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # AUTOMATIC1111's own pattern


def _quote(value) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def format_parameters(prompt: str, seed: int, settings: dict) -> str:
    """The ``parameters`` text of one render; ``settings`` as ``DreamBoothModule.render_settings()`` gives them."""
    pairs = {
        "Steps": settings["num_inference_steps"],
        "Sampler": A1111_SAMPLERS.get(settings["sampler"], settings["sampler"]),
        "CFG scale": settings["guidance_scale"],
        "Seed": seed,
        "Size": f"{settings['width']}x{settings['height']}",
        "Model": settings["base_model"],
        "Lora": settings.get("lora_weights"),
        "Lora UNet scale": settings.get("lora_scale"),
        "Lora TE scale": settings.get("lora_text_encoder_scale"),
        "ControlNet": settings.get("controlnet"),
        "ControlNet scale": settings.get("controlnet_conditioning_scale"),
        "Version": "dreambooth-lightning",
    }
    lines = [prompt]
    if settings.get("negative_prompt"):
        lines.append(f"Negative prompt: {settings['negative_prompt']}")
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in pairs.items() if v is not None))
    return "\n".join(lines)


def parse_parameters(text: str) -> dict[str, str]:
    """Read a ``parameters`` text back: ``Prompt``, ``Negative prompt`` and the ``Key: value`` pairs, as strings."""
    *head, last = text.strip().split("\n")
    if not _PAIR.findall(last):  # no settings line: all of it is the prompt
        head, last = [*head, last], ""
    out: dict[str, str] = {}
    negative = [i for i, line in enumerate(head) if line.startswith("Negative prompt:")]
    if negative:
        out["Prompt"] = "\n".join(head[: negative[0]])
        out["Negative prompt"] = "\n".join(head[negative[0] :]).removeprefix("Negative prompt:").strip()
    else:
        out["Prompt"] = "\n".join(head)
    for key, value in _PAIR.findall(last):
        out[key.strip()] = json.loads(value) if value.startswith('"') else value.strip()
    return out


def save_png(image: Image.Image, path: str | Path, text: dict[str, str]) -> Path:
    """Write ``image`` as a PNG with ``text`` chunks, atomically: ``path`` is absent or complete, never partial."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    for key, value in text.items():
        if value.isascii():
            info.add_text(key, value)
        else:
            info.add_itxt(key, value)  # UTF-8; tEXt chunks are Latin-1
    with atomic_write(path) as f:
        image.save(f, format="PNG", pnginfo=info)
    return path


def render_text_chunks(prompt: str, seed: int, settings: dict) -> dict[str, str]:
    """Both chunks of one render: the AUTOMATIC1111 ``parameters`` text and the JSON record."""
    record = {"prompt": prompt, "seed": seed, **settings}
    return {PARAMETERS_KEY: format_parameters(prompt, seed, settings), JSON_KEY: json.dumps(record)}
