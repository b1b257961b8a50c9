"""A class-image generation killed with SIGKILL leaves no partial image, and a second run tops up to exactly N."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from datamodules.class_images import RECORD_NAME, generate_class_images
from datamodules.images import list_images, load_image

ROOT = Path(__file__).resolve().parents[2]
N = 6
GENERATE = f"""
import sys
from datamodules.class_images import generate_class_images
generate_class_images("builtin:tiny-sd", "a photo of ball", sys.argv[1], {N}, 64, batch_size=1, num_inference_steps=2)
"""


def test_killed_generation_leaves_whole_images_and_resumes_to_exactly_n(tmp_path):
    folder = tmp_path / "class"
    proc = subprocess.Popen([sys.executable, "-c", GENERATE, str(folder)], cwd=ROOT)
    deadline = time.monotonic() + 300
    while (not folder.is_dir() or len(list_images(folder)) < 2) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.05)  # into the next image
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    made = list_images(folder)
    assert 2 <= len(made) < N
    for path in made:
        assert load_image(path).size == (64, 64)  # every image there is whole
    json.loads((folder / RECORD_NAME).read_text())  # the record is whole too
    assert {p.name for p in folder.iterdir() if not p.name.startswith(".")} == {p.name for p in made} | {RECORD_NAME}

    assert generate_class_images("builtin:tiny-sd", "a photo of ball", folder, N, 64, num_inference_steps=2) == N - len(
        made
    )
    assert [p.name for p in list_images(folder)] == [f"class_{i:05d}.png" for i in range(N)]
