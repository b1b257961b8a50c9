"""Validation prompt templates: the 25 DreamBench prompts as data, and template rendering.

Templates name two placeholders: ``{identifier}`` (the rare token, e.g. ``sks``) and ``{class_noun}`` (e.g. ``dog``).
The DreamBench lists are those of the DreamBooth paper's evaluation (google/dreambooth ``dataset/prompts_and_classes.txt``,
CC BY 4.0): objects get the first list, live subjects (pets) the second.
"""

from __future__ import annotations

import string

from core.errors import ConfigError

PLACEHOLDERS = ("identifier", "class_noun")

DREAMBENCH_OBJECT_PROMPTS: tuple[str, ...] = (
    "a {identifier} {class_noun} in the jungle",
    "a {identifier} {class_noun} in the snow",
    "a {identifier} {class_noun} on the beach",
    "a {identifier} {class_noun} on a cobblestone street",
    "a {identifier} {class_noun} on top of pink fabric",
    "a {identifier} {class_noun} on top of a wooden floor",
    "a {identifier} {class_noun} with a city in the background",
    "a {identifier} {class_noun} with a mountain in the background",
    "a {identifier} {class_noun} with a blue house in the background",
    "a {identifier} {class_noun} on top of a purple rug in a forest",
    "a {identifier} {class_noun} with a wheat field in the background",
    "a {identifier} {class_noun} with a tree and autumn leaves in the background",
    "a {identifier} {class_noun} with the Eiffel Tower in the background",
    "a {identifier} {class_noun} floating on top of water",
    "a {identifier} {class_noun} floating in an ocean of milk",
    "a {identifier} {class_noun} on top of green grass with sunflowers around it",
    "a {identifier} {class_noun} on top of a mirror",
    "a {identifier} {class_noun} on top of the sidewalk in a crowded street",
    "a {identifier} {class_noun} on top of a dirt road",
    "a {identifier} {class_noun} on top of a white rug",
    "a red {identifier} {class_noun}",
    "a purple {identifier} {class_noun}",
    "a shiny {identifier} {class_noun}",
    "a wet {identifier} {class_noun}",
    "a cube shaped {identifier} {class_noun}",
)

DREAMBENCH_LIVE_PROMPTS: tuple[str, ...] = (
    "a {identifier} {class_noun} in the jungle",
    "a {identifier} {class_noun} in the snow",
    "a {identifier} {class_noun} on the beach",
    "a {identifier} {class_noun} on a cobblestone street",
    "a {identifier} {class_noun} on top of pink fabric",
    "a {identifier} {class_noun} on top of a wooden floor",
    "a {identifier} {class_noun} with a city in the background",
    "a {identifier} {class_noun} with a mountain in the background",
    "a {identifier} {class_noun} with a blue house in the background",
    "a {identifier} {class_noun} on top of a purple rug in a forest",
    "a {identifier} {class_noun} wearing a red hat",
    "a {identifier} {class_noun} wearing a santa hat",
    "a {identifier} {class_noun} wearing a rainbow scarf",
    "a {identifier} {class_noun} wearing a black top hat and a monocle",
    "a {identifier} {class_noun} in a chef outfit",
    "a {identifier} {class_noun} in a firefighter outfit",
    "a {identifier} {class_noun} in a police outfit",
    "a {identifier} {class_noun} wearing pink glasses",
    "a {identifier} {class_noun} wearing a yellow shirt",
    "a {identifier} {class_noun} in a purple wizard outfit",
    "a red {identifier} {class_noun}",
    "a purple {identifier} {class_noun}",
    "a shiny {identifier} {class_noun}",
    "a wet {identifier} {class_noun}",
    "a cube shaped {identifier} {class_noun}",
)

DEFAULT_PROMPTS: tuple[str, ...] = (
    "a photo of {identifier} {class_noun}",
    "a {identifier} {class_noun} on the beach",
    "a {identifier} {class_noun} in the snow",
    "a red {identifier} {class_noun}",
)

PROMPT_SETS = {
    "default": DEFAULT_PROMPTS,
    "dreambench_object": DREAMBENCH_OBJECT_PROMPTS,
    "dreambench_live": DREAMBENCH_LIVE_PROMPTS,
}


def resolve_templates(prompts: str | list[str], option: str = "data.validation_prompts") -> list[str]:
    """A built-in set name (``default``, ``dreambench_object``, ``dreambench_live``) or a list of templates -> templates.

    Raises ValueError naming the option and the placeholder when a template uses an unknown one.
    """
    if isinstance(prompts, str):
        if prompts not in PROMPT_SETS:
            raise ConfigError(f"{option}: unknown prompt set {prompts!r}; choose {sorted(PROMPT_SETS)} or give a list.")
        return list(PROMPT_SETS[prompts])
    for template in prompts:
        for _, field, _, _ in string.Formatter().parse(template):
            if field is not None and field not in PLACEHOLDERS:
                raise ConfigError(
                    f"{option}: template {template!r} uses unknown placeholder {{{field}}}; "
                    f"allowed: {', '.join('{' + p + '}' for p in PLACEHOLDERS)}."
                )
    return list(prompts)


def fill(template: str, identifier: str, class_noun: str) -> str:
    """Render one template."""
    return template.format(identifier=identifier, class_noun=class_noun)
