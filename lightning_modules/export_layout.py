"""The names of the files in a run's ``export/`` folder, in one place (no imports: every module may read them).

- ``pytorch_lora_weights.safetensors``: LoRA adapters in the diffusers format (``load_lora_weights(export_dir)``);
- ``pytorch_lora_weights_kohya.safetensors``: the same in the kohya format (AUTOMATIC1111, ComfyUI);
- ``pipeline/``: a full fine-tune as a diffusers folder; ``model.safetensors`` the same as one original-layout file;
- ``export_info.json``: what was exported, from which base model.
"""

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"
PIPELINE_DIRNAME = "pipeline"
SINGLE_FILE_NAME = "model.safetensors"
INFO_NAME = "export_info.json"
