"""The Lightning-free Stable Diffusion layer (SD 1.x, 2.x, XL): models, adapters, export, rendering, training.

- ``sd.models``: base-model families, loading (hub id, folder, single file, ``builtin:``), original layouts, the
  models built offline (tiny, toy);
- ``sd.adapters``: what is trained on top of a base model: LoRA and its variants (peft), their file formats, new tokens;
- ``sd.export``: the export folder: its file names, writing it, loading it back;
- ``sd.render``: a pipeline around the live modules, seeded sampling, ControlNet, PNG metadata;
- ``sd.training``: the DreamBooth objective, loss recipes, the held-out loss.

Nothing here imports Lightning; the subpackages import each other in one direction: ``models`` <- ``adapters`` <-
``export``, and ``render`` / ``training`` read ``models``.
"""

import logging

# bitsandbytes (imported by peft) looks for an optional CPU 4-bit kernel on the model hub when it is imported and logs
# a warning when that fails (offline, or an untrusted repository); nothing here uses a 4-bit kernel. Set before any
# submodule imports peft.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
