"""Move the Lightning-free Stable Diffusion layer out of ``lightning_modules/`` (issue 12, "Structure").

Run from anywhere inside the repository: ``python scripts/restructure.py`` (``--dry-run`` lists what it would do).

What it does, driven by the two tables below and nothing else:

1. in ``lightning_modules/*.py``, relative imports (``from .x import``) become absolute ones (so they survive a move);
2. ``git mv`` of every module in ``MODULES`` and every test file in ``TESTS`` whose old path exists and new path
   does not; a missing ``__init__.py`` of each new package is created (``git add``);
3. in every tracked or new (not ignored) text file (``*.py``, ``*.md``, ``*.yaml``, ``*.toml``, ``Makefile``, ...),
   every mention of a moved module is rewritten: ``from lightning_modules.x import``, ``import lightning_modules.x``,
   ``from lightning_modules import x [as y]``, dotted names in strings (``class_path``, ``monkeypatch`` / ``mock.patch``
   targets, ``python -m ...``, ``:mod:`` references) and file paths (``lightning_modules/x.py``,
   ``tests/lightning_modules/test_x.py``);
4. a moved file's ``Path(__file__)...parents[N]`` is shifted by how much deeper it now lies;
5. ``pyproject.toml``'s ``[tool.setuptools.packages.find] include`` gains the new top-level packages;
6. ``ruff check --select I --fix`` and ``ruff format`` on the Python files it changed (import order), when ruff is
   installed beside this Python or on PATH.

Idempotent: a second run finds nothing to move and nothing to rewrite. Modules that others add to
``lightning_modules/`` later and that are not in ``MODULES`` stay where they are; their imports of moved modules are
rewritten like every other file's. This file (and ``scripts/restructure.py`` when a copy runs from elsewhere) is
never rewritten: it holds the old names.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

# old module -> new module. lightning_modules/ keeps the LightningModule and what it alone uses (dreambooth, ema,
# optim, fused_optim, memory, numerics, strategies).
MODULES = {
    # what every package uses: user-input errors, atomic writes and safe loads, random-state helpers
    "lightning_modules.errors": "core.errors",
    "lightning_modules.safe_files": "core.safe_files",
    "lightning_modules.rng_state": "core.rng_state",
    # base models: families, loading (hub id, folder, single file, builtin:), original layouts, offline models
    "lightning_modules.families": "sd.models.families",
    "lightning_modules.sd_loading": "sd.models.loading",
    "lightning_modules.single_file": "sd.models.single_file",
    "lightning_modules.sd_layout": "sd.models.original_layout",
    "lightning_modules.ldm_config": "sd.models.ldm_config",
    "lightning_modules.sd_configs": "sd.models.configs",
    "lightning_modules.builtin_models": "sd.models.builtin",
    "lightning_modules.toy_models": "sd.models.toy",
    "lightning_modules.clip_tokenizer": "sd.models.clip_tokenizer",
    # what is trained on top of a base model: LoRA and its variants, their file formats, new tokens
    "lightning_modules.lora": "sd.adapters.lora",
    "lightning_modules.lora_formats": "sd.adapters.formats",
    "lightning_modules.new_tokens": "sd.adapters.new_tokens",
    # the export folder: its file names, writing it, loading it back
    "lightning_modules.export_layout": "sd.export.layout",
    "lightning_modules.export": "sd.export.folder",
    # rendering: the pipeline around the live modules, seeded sampling, ControlNet, PNG metadata
    "lightning_modules.pipeline": "sd.render.pipeline",
    "lightning_modules.sampling": "sd.render.sampling",
    "lightning_modules.controlnet": "sd.render.controlnet",
    "lightning_modules.infotext": "sd.render.infotext",
    # the training math: the DreamBooth objective, loss recipes, the held-out loss
    "lightning_modules.diffusion": "sd.training.diffusion",
    "lightning_modules.loss_recipes": "sd.training.loss_recipes",
    "lightning_modules.heldout": "sd.training.heldout",
}

# tests mirror the source tree: the unit tests of moved modules move with them
TESTS = {
    "tests/lightning_modules/test_rng_state.py": "tests/core/test_rng_state.py",
    "tests/lightning_modules/test_builtin_models.py": "tests/sd/models/test_builtin.py",
    "tests/lightning_modules/test_single_file.py": "tests/sd/models/test_single_file.py",
    "tests/lightning_modules/test_sd_layout.py": "tests/sd/models/test_original_layout.py",
    "tests/lightning_modules/test_lora_formats.py": "tests/sd/adapters/test_formats.py",
    "tests/lightning_modules/test_export.py": "tests/sd/export/test_folder.py",
    "tests/lightning_modules/test_infotext.py": "tests/sd/render/test_infotext.py",
    "tests/lightning_modules/test_render_components.py": "tests/sd/render/test_render_components.py",
    "tests/lightning_modules/test_diffusion.py": "tests/sd/training/test_diffusion.py",
    "tests/lightning_modules/test_loss_recipes.py": "tests/sd/training/test_loss_recipes.py",
}

# the docstring of each new package's __init__.py (created only when missing)
PACKAGE_DOCS = {
    "core": "What every package uses, Lightning-free: user-input errors, atomic writes and safe loads, random state.",
    "sd": "The Lightning-free Stable Diffusion layer (SD 1.x, 2.x, XL): models, adapters, export, rendering, training.",
    "sd.models": "Base models: families, loading (hub id, folder, single file, builtin:), original layouts, offline models.",
    "sd.adapters": "What is trained on top of a base model: LoRA and its variants (peft), their file formats, new tokens.",
    "sd.export": "The export folder: the names of its files, writing it (LoRA, full fine-tune), loading it back.",
    "sd.render": "Rendering: a pipeline around the live modules, seeded sampling, ControlNet, PNG metadata.",
    "sd.training": "The training math: the DreamBooth objective, loss recipes, the held-out loss.",
}

TEXT_SUFFIXES = {".py", ".pyi", ".md", ".rst", ".txt", ".yaml", ".yml", ".toml", ".cfg", ".ini"}
TEXT_NAMES = {"Makefile"}
OLD_PACKAGE = "lightning_modules"
SELF = Path("scripts/restructure.py")  # never rewritten, wherever this copy runs from


def module_path(dotted: str) -> Path:
    return Path(*dotted.split(".")).with_suffix(".py")


def git(*args: str, check: bool = True) -> str:
    return subprocess.run(["git", *args], check=check, capture_output=True, text=True).stdout


def text_files(root: Path) -> list[Path]:
    """Tracked files and new ones that git does not ignore, that hold text this script may rewrite."""
    names = git("ls-files", "--cached", "--others", "--exclude-standard", "-z").split("\0")
    me = Path(__file__).resolve()
    out = []
    for name in sorted(set(filter(None, names))):
        path = root / name
        if not path.is_file() or path.resolve() == me or Path(name) == SELF:
            continue
        if path.suffix in TEXT_SUFFIXES or path.name in TEXT_NAMES:
            out.append(path)
    return out


# ------------------------------------------------------------------------------------------------ 1. relative imports
RELATIVE = re.compile(r"^(\s*)from \.(\w*) import ", re.M)


def absolute_imports(text: str) -> str:
    """``from .x import`` -> ``from lightning_modules.x import``; ``from . import`` -> ``from lightning_modules import``."""
    return RELATIVE.sub(lambda m: f"{m[1]}from {OLD_PACKAGE}{'.' + m[2] if m[2] else ''} import ", text)


# ---------------------------------------------------------------------------------------------------- 3. rewriting
def _dotted_rules() -> list[tuple[re.Pattern, str]]:
    rules = []
    for old, new in MODULES.items():
        rules.append((re.compile(rf"(?<![\w.]){re.escape(old)}(?!\w)"), new))
        rules.append((re.compile(rf"(?<![\w/.-]){re.escape(str(module_path(old)))}(?!\w)"), str(module_path(new))))
    for old, new in TESTS.items():
        rules.append((re.compile(rf"(?<![\w/.-]){re.escape(old)}(?!\w)"), new))
        old_dotted, new_dotted = old.removesuffix(".py").replace("/", "."), new.removesuffix(".py").replace("/", ".")
        rules.append((re.compile(rf"(?<![\w.]){re.escape(old_dotted)}(?!\w)"), new_dotted))
    return rules


FROM_PACKAGE = re.compile(rf"^([ \t]*)from {OLD_PACKAGE} import (\([^)]*\)|[^\n]*)$", re.M)


def _from_package(m: re.Match) -> str:
    """``from lightning_modules import a, b as c`` with moved modules -> one import line per moved module."""
    indent, names = m[1], m[2].strip().strip("()")
    kept, lines = [], []
    for item in (i.strip() for i in names.replace("\n", " ").split(",")):
        if not item:
            continue
        name, _, alias = (part.strip() for part in item.partition(" as "))
        new = MODULES.get(f"{OLD_PACKAGE}.{name}")
        if new is None:
            kept.append(item)
            continue
        package, leaf = new.rsplit(".", 1)
        local = alias or name
        lines.append(f"{indent}from {package} import {leaf}" + (f" as {local}" if local != leaf else ""))
    if not lines:
        return m[0]
    if kept:
        lines.insert(0, f"{indent}from {OLD_PACKAGE} import {', '.join(kept)}")
    return "\n".join(lines)


def rewrite(text: str, is_python: bool, rules: list[tuple[re.Pattern, str]]) -> str:
    if is_python:
        text = FROM_PACKAGE.sub(_from_package, text)
    for pattern, new in rules:
        text = pattern.sub(new, text)
    return text


PARENTS = re.compile(r"(Path\(__file__\)(?:\.resolve\(\))?\.parents\[)(\d+)(\])")


def shift_parents(text: str, delta: int) -> str:
    """``Path(__file__).resolve().parents[N]`` of a file that now lies ``delta`` folders deeper."""
    return PARENTS.sub(lambda m: f"{m[1]}{int(m[2]) + delta}{m[3]}", text)


# ----------------------------------------------------------------------------------------------------- 5. pyproject
INCLUDE = re.compile(r"(\[tool\.setuptools\.packages\.find\][^\[]*?include\s*=\s*\[)([^\]]*)(\])", re.S)


def add_packages(text: str) -> str:
    tops = sorted({new.split(".")[0] for new in MODULES.values()})

    def fix(m: re.Match) -> str:
        items = [i.strip() for i in m[2].split(",") if i.strip()]
        have = {i.strip("\"'") for i in items}
        items += [f'"{t}*"' for t in tops if f"{t}*" not in have]
        return f"{m[1]}{', '.join(items)}{m[3]}"

    return INCLUDE.sub(fix, text)


# ------------------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="say what would change; change nothing")
    args = parser.parse_args(argv)
    root = Path(git("rev-parse", "--show-toplevel").strip())
    os.chdir(root)
    dry = args.dry_run
    changed: set[Path] = set()

    # 1. relative imports in lightning_modules/ become absolute, before anything moves
    for path in sorted(Path(OLD_PACKAGE).glob("*.py")):
        text = path.read_text()
        new = absolute_imports(text)
        if new != text:
            print(f"absolute imports: {path}")
            changed.add(path)
            if not dry:
                path.write_text(new)

    # 2. the moves
    moves = {module_path(old): module_path(new) for old, new in MODULES.items()}
    moves |= {Path(old): Path(new) for old, new in TESTS.items()}
    moved: dict[Path, int] = {}  # new path -> how many folders deeper it lies
    for src, dst in moves.items():
        if src.exists() and dst.exists():
            print(f"error: both {src} and {dst} exist; merge them by hand, then run again", file=sys.stderr)
            return 1
        if not src.exists():
            if not dst.exists():
                print(f"note: {src} does not exist (nothing to move)")
            continue
        print(f"git mv {src} {dst}")
        if not dry:
            dst.parent.mkdir(parents=True, exist_ok=True)
            git("mv", str(src), str(dst))
        moved[dst] = len(dst.parts) - len(src.parts)

    # the new packages' __init__.py: source packages with a docstring, test packages empty (as tests/ has them)
    packages = {Path(*p.split(".")) for new in MODULES.values() for p in _prefixes(new.rsplit(".", 1)[0])}
    test_packages = {d for new in TESTS.values() for d in _folders(Path(new).parent)}
    for folder in sorted(packages | test_packages):
        init = folder / "__init__.py"
        if init.exists():
            continue
        doc = PACKAGE_DOCS.get(".".join(folder.parts))
        print(f"create {init}")
        if not dry:
            folder.mkdir(parents=True, exist_ok=True)
            init.write_text(f'"""{doc}"""\n' if doc else "")
            git("add", str(init))
        changed.add(init)

    # 3. + 4. rewrite every mention; shift __file__-relative paths of what moved
    rules = _dotted_rules()
    for path in text_files(root):
        rel = path.relative_to(root)
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        new = rewrite(text, path.suffix in (".py", ".pyi"), rules)
        if rel in moved and moved[rel]:
            new = shift_parents(new, moved[rel])
        if rel.name == "pyproject.toml" and rel.parent == Path("."):
            new = add_packages(new)
        if new != text:
            print(f"rewrite: {rel}")
            changed.add(rel)
            if not dry:
                path.write_text(new)

    # 6. import order and formatting of the Python files changed
    py = sorted(str(p) for p in changed if p.suffix == ".py" and (root / p).exists())
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if py and not dry:
        if ruff is None:
            print("note: ruff not found; run `ruff check --select I --fix . && ruff format .` yourself")
        else:
            subprocess.run([ruff, "check", "--quiet", "--select", "I", "--fix", *py], check=False)
            subprocess.run([ruff, "format", "--quiet", *py], check=False)
    print(f"{len(moved)} files moved, {len(changed)} files changed" + (" (dry run: nothing written)" if dry else ""))
    return 0


def _prefixes(dotted: str) -> list[str]:
    parts = dotted.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _folders(folder: Path) -> list[Path]:
    """``tests/sd/models`` -> ``tests/sd``, ``tests/sd/models`` (not ``tests`` itself, which exists)."""
    return [Path(*folder.parts[: i + 1]) for i in range(1, len(folder.parts))]


if __name__ == "__main__":
    sys.exit(main())
