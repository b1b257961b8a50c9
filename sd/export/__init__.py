"""The export folder: the names of its files, writing it (LoRA, full fine-tune), loading it back."""
