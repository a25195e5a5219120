"""Counted nouns in messages: "1 run", "2 runs", never "1 runs".

Imports nothing, so the commands that must answer at once (``cl report``, ``cl status``) can use
it without pulling in rich or torch.
"""

from __future__ import annotations


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``count`` and the noun in the form the count needs (``nouns`` for irregular plurals)."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"
