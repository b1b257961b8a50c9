"""``test`` data: the DreamBench evaluation protocol's subjects and prompts. Lightning-free.

A subject is a folder of real images with a class noun and its prompt templates. ``test`` evaluates either the subject
the run trained on, or every subject of a folder in the DreamBench layout (google/dreambooth ``dataset/``): one
sub-folder of images per subject, and ``prompts_and_classes.txt`` with the subject -> class table and the two prompt
lists (objects; live subjects, i.e. pets). Each subject's prompts are filled with the identifier and its class noun;
the bare class prompt (for PRES) follows them.
"""

from __future__ import annotations

import csv
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.data import Dataset

from core.errors import ConfigError, InputFileError, InputNotFoundError
from datamodules.images import check_image_folder
from datamodules.prompts import PROMPT_SETS, fill, resolve_templates
from datamodules.validation import ValidationBatch, collate_prompts

log = logging.getLogger(__name__)

TABLE_NAME = "prompts_and_classes.txt"
# The paper's live subjects are its pets (cats and dogs); they get the live prompt list, every other subject the
# object list.
LIVE_CLASSES = frozenset({"cat", "dog"})
DREAMBENCH = "dreambench"  # data.eval_prompts: the object or live list, by each subject's class


class EvalBatch(ValidationBatch):
    """P prompts of one or more subjects; the module renders ``num_images`` images for each."""

    subject_index: Tensor  # (P,) long: the subject of each prompt
    num_images: int  # images per prompt (the protocol's N)


@dataclass(frozen=True)
class EvalSubject:
    """One evaluated subject: its real images, class noun and prompt templates (and its own identifier, for a
    concept of ``data.concepts``; None: the run's)."""

    name: str
    class_noun: str
    image_dir: Path
    templates: tuple[str, ...]
    identifier: str | None = None

    @property
    def live(self) -> bool:
        return self.class_noun in LIVE_CLASSES


class DreamBenchTable(NamedTuple):
    classes: dict[str, str]  # subject folder name -> class noun
    object_prompts: list[str] | None  # templates, or None when the file has no list
    live_prompts: list[str] | None


def read_dreambench_table(path: str | Path) -> DreamBenchTable:
    """Parse ``prompts_and_classes.txt``: the ``subject_name,class`` table, and the ``'...'.format(unique_token,
    class_token)`` prompt lines under "Object Prompts" / "Live Subject Prompts" ({0} -> identifier, {1} -> class)."""
    path = Path(path)
    classes: dict[str, str] = {}
    prompts: dict[str, list[str]] = {"object": [], "live": []}
    section = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        lower = line.lower()
        if lower.startswith("object prompts"):
            section = "object"
        elif lower.startswith("live subject prompts"):
            section = "live"
        elif lower == "subject_name,class":
            section = "classes"
        elif section == "classes" and line.count(",") == 1:
            name, noun = (part.strip() for part in next(csv.reader([line])))
            if name and noun:
                classes[name] = noun
        elif section in prompts and (match := re.match(r"""^['"](.*)['"]\.format\(""", line)):
            template = match.group(1).replace("{0}", "{identifier}").replace("{1}", "{class_noun}")
            prompts[section].append(template)
    if not classes:
        raise InputFileError(f"{str(path)!r} holds no 'subject_name,class' table (see the DreamBench {TABLE_NAME}).")
    return DreamBenchTable(classes, prompts["object"] or None, prompts["live"] or None)


def subject_templates(
    class_noun: str,
    prompts: str | list[str],
    num_prompts: int | None = None,
    table: DreamBenchTable | None = None,
    option: str = "data.eval_prompts",
) -> tuple[str, ...]:
    """The templates of one subject: ``dreambench`` picks the live or object list by class (the table's, if it has
    them, else the built-in copies); a set name or a list applies to every subject. ``num_prompts`` keeps the first N."""
    if prompts == DREAMBENCH:
        live = class_noun in LIVE_CLASSES
        from_table = table and (table.live_prompts if live else table.object_prompts)
        templates = from_table or list(PROMPT_SETS["dreambench_live" if live else "dreambench_object"])
    else:
        templates = resolve_templates(prompts, option)
    return tuple(templates[:num_prompts] if num_prompts else templates)


def dreambench_subjects(
    root: str | Path,
    prompts: str | list[str] = DREAMBENCH,
    names: list[str] | None = None,
    num_prompts: int | None = None,
    option: str = "data.eval_data_dir",
) -> list[EvalSubject]:
    """The subjects of a DreamBench-layout folder, in table order. Subjects of the table without a folder are skipped
    with a warning (a partial copy of the dataset works); ``names`` picks some, and each of them must exist."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise InputNotFoundError(f"{option}: the folder {str(root)!r} does not exist.")
    if not (root / TABLE_NAME).is_file():
        raise InputNotFoundError(
            f"{option}: {str(root)!r} has no {TABLE_NAME} (the DreamBench subject -> class table and prompt lists)."
        )
    table = read_dreambench_table(root / TABLE_NAME)
    unknown = sorted(set(names or []) - set(table.classes))
    if unknown:
        raise ConfigError(f"data.eval_subjects: {unknown} are not in {root / TABLE_NAME} ({sorted(table.classes)}).")
    wanted = names or list(table.classes)
    present = [n for n in wanted if (root / n).is_dir()]
    missing = [n for n in wanted if n not in present]
    if names and missing:
        raise InputNotFoundError(f"data.eval_subjects: no folder for {missing} in {str(root)!r}.")
    if missing:
        log.warning(
            "%s: %d subjects of %s have no folder and are skipped: %s", option, len(missing), TABLE_NAME, missing
        )
    if not present:
        raise InputNotFoundError(f"{option}: none of the subjects of {TABLE_NAME} has a folder in {str(root)!r}.")
    subjects = []
    for name in present:
        check_image_folder(root / name, f"{option} ({name})")
        noun = table.classes[name]
        subjects.append(EvalSubject(name, noun, root / name, subject_templates(noun, prompts, num_prompts, table)))
    return subjects


class EvalPromptDataset(Dataset):
    """Rows over subjects: each subject's prompts, then its bare class prompt (for PRES).

    Prompt ``i`` of every subject renders with seed ``seed + i`` (the class prompt with ``seed + len(templates)``), so
    subjects with the same prompts share seeds.

    Args:
        subjects: The subjects, in report order.
        identifier: The rare token in the prompts, e.g. ``sks``.
        class_prompt_template: Template of the bare class prompt (e.g. ``"a {class_noun}"``), or None for no PRES.
        seed: Base seed.
    """

    def __init__(
        self, subjects: list[EvalSubject], identifier: str, class_prompt_template: str | None, seed: int = 0
    ) -> None:
        self.rows: list[dict] = []
        for s_index, subject in enumerate(subjects):
            token = subject.identifier or identifier
            rows = [(fill(t, token, subject.class_noun), False) for t in subject.templates]
            if class_prompt_template:
                rows.append((fill(class_prompt_template, token, subject.class_noun), True))
            for p_index, (prompt, is_class) in enumerate(rows):
                self.rows.append(
                    {
                        "prompt": prompt,
                        "prompt_index": p_index,
                        "prompt_seed": seed + p_index,
                        "is_class_prompt": is_class,
                        "subject_index": s_index,
                    }
                )

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def collate_eval(items: list[dict], num_images: int) -> EvalBatch:
    subject_index = torch.tensor([it["subject_index"] for it in items], dtype=torch.long)
    return EvalBatch(**collate_prompts(items), subject_index=subject_index, num_images=num_images)
