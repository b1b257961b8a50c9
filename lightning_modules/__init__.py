"""The LightningModule (dreambooth.py) and the Lightning-free Stable Diffusion components it drives."""

import logging

# bitsandbytes (imported by peft) looks for an optional CPU 4-bit kernel on the model hub when it is imported and logs
# a warning when that fails (offline, or an untrusted repository); nothing here uses a 4-bit kernel. Set before any
# submodule imports peft.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
