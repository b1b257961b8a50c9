"""What is trained on top of a base model: LoRA and its variants (peft), their file formats, new tokens."""
