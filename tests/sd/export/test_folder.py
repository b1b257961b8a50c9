"""The export folder: what each kind holds, what it records, and loading it back."""

from __future__ import annotations

import json

import pytest
import torch

from sd.export.folder import export_full, load_export
from sd.export.layout import INFO_NAME, SINGLE_FILE_NAME
from sd.models.loading import load_components


@pytest.mark.parametrize("single_file", [True, False])
def test_full_export_holds_the_single_file_only_when_asked(tmp_path, single_file):
    parts = load_components("builtin:tiny-sd")
    with torch.no_grad():
        parts.unet.conv_out.bias.add_(0.5)  # a "trained" UNet
    export_full(parts.unet, None, tmp_path / "export", "builtin:tiny-sd", single_file=single_file)
    info = json.loads((tmp_path / "export" / INFO_NAME).read_text())
    assert info["kind"] == "full" and info["base_model"] == "builtin:tiny-sd"
    assert (tmp_path / "export" / SINGLE_FILE_NAME).is_file() == single_file
    assert (SINGLE_FILE_NAME in info["files"]) == single_file
    loaded = load_export(tmp_path / "export")
    assert torch.equal(loaded.unet.conv_out.bias, parts.unet.conv_out.bias)


def test_missing_or_foreign_export_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_export"):
        load_export(tmp_path / "no_such_export")
    (tmp_path / "photos").mkdir()
    with pytest.raises(FileNotFoundError, match=rf"photos.*{INFO_NAME}"):
        load_export(tmp_path / "photos")
