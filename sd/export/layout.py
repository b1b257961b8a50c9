"""The files of a run's ``export/`` folder, in one place: their names, and which file of a folder a LoRA loads from.

Light (no torch), so it runs at config time; it imports only :mod:`core.errors`.

- ``pytorch_lora_weights.safetensors``: LoRA adapters in the diffusers format (``load_lora_weights(export_dir)``);
- ``pytorch_lora_weights_kohya.safetensors``: the same in the kohya format (AUTOMATIC1111, ComfyUI);
- ``pipeline/``: a full fine-tune as a diffusers folder; ``model.safetensors`` the same as one original-layout file;
- ``export_info.json``: what was exported, from which base model.
"""

from __future__ import annotations

import json
from pathlib import Path

from core.errors import InputFileError, InputNotFoundError

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"
PIPELINE_DIRNAME = "pipeline"
SINGLE_FILE_NAME = "model.safetensors"
INFO_NAME = "export_info.json"


def resolve_lora_file(path: str | Path, option: str = "model.lora_weights") -> Path:
    """An export folder (holding ``pytorch_lora_weights.safetensors``) or a LoRA ``.safetensors`` file -> the file.

    Cheap (no loading), so it runs at config time. Raises FileNotFoundError naming ``option`` and the path.
    """
    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise InputFileError(
                f"{option}: {str(path)!r} is not a .safetensors LoRA file: only .safetensors LoRA files are read "
                "(pickle-based files can execute code when loaded)."
            )
        return path
    if not path.is_dir():
        raise InputNotFoundError(
            f"{option}: {str(path)!r} does not exist. Give the export folder that fit wrote (<run dir>/export) or its "
            f"{LORA_WEIGHT_NAME}."
        )
    if (path / LORA_WEIGHT_NAME).is_file():
        return path / LORA_WEIGHT_NAME
    if (path / PIPELINE_DIRNAME / "model_index.json").is_file():
        raise InputNotFoundError(
            f"{option}: {str(path)!r} holds a full fine-tune ({PIPELINE_DIRNAME}/), not LoRA weights: render it with "
            f"--model.pretrained_model_name_or_path {path / PIPELINE_DIRNAME} instead."
        )
    adapter = _exported_adapter(path)
    if adapter in ("loha", "lokr"):
        raise InputFileError(f"{option}: {str(path)!r} {lycoris_export_note(adapter)}")
    raise InputNotFoundError(f"{option}: the folder {str(path)!r} holds no {LORA_WEIGHT_NAME}.")


def _exported_adapter(folder: Path) -> str | None:
    """The adapter an export folder's info file names (written for dora, loha and lokr), else None."""
    try:
        return json.loads((folder / INFO_NAME).read_text()).get("adapter")
    except (OSError, ValueError, AttributeError):
        return None


def lycoris_export_note(adapter: str) -> str:
    """What a LoHa / LoKr export is for, and how to render the run here instead."""
    return (
        f"holds a {adapter} export ({KOHYA_WEIGHT_NAME}: LyCORIS key names for AUTOMATIC1111 and ComfyUI), which "
        "diffusers does not load. Render or evaluate the run from its checkpoint instead: "
        f"--ckpt_path <run dir>/checkpoints/last.ckpt --model.adapter {adapter} (with the run's other model settings)."
    )
