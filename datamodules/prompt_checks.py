"""Checks on the prompts, Lightning-free: the instance prompt must name the subject with an identifier."""

from __future__ import annotations

import re


def prompt_words(prompt: str) -> set[str]:
    """The lower-case words of a prompt (letters, digits and underscores, in any script)."""
    return set(re.findall(r"\w+", prompt.lower()))


def identifier_words(instance_prompt: str, class_prompt: str) -> set[str]:
    """Words of the instance prompt that the class prompt lacks: the identifier (``sks`` in "a photo of sks dog").

    Empty when the instance prompt says nothing the class prompt does not: then the subject has no identifier of its
    own, and prior preservation (which keeps the class prompt's meaning) works against learning it.
    """
    return prompt_words(instance_prompt) - prompt_words(class_prompt)


def missing_identifier_message(instance_prompt: str, class_prompt: str) -> str | None:
    """A warning when the instance prompt has no identifier, else None."""
    if identifier_words(instance_prompt, class_prompt):
        return None
    return (
        f"data.instance_prompt {instance_prompt!r} has no word that data.class_prompt {class_prompt!r} lacks: the "
        "subject has no identifier of its own, so training ties it to the class itself (and prior preservation "
        "pulls the other way). Put a rare identifier in the instance prompt only, e.g. 'a photo of sks dog' with "
        "the class prompt 'a photo of dog'."
    )
