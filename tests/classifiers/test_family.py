"""The task-family tagger: a few prompts of each family, read the way a person would."""

from __future__ import annotations

import pytest

from classifiers.family import FAMILIES, TAG_PATTERN, family_of


@pytest.mark.parametrize(
    ("text", "family"),
    [
        ("Write a Python function that merges two sorted lists.", "code"),
        ('def add(a, b):\n    """Return the sum."""\n', "code"),
        ("Why does this fail?\n```\nx = [1, 2\n```", "code"),
        ("Solve for x: 3x + 5 = 20", "math"),
        ("Find $\\frac{1}{2} + \\frac{1}{3}$.", "math"),
        ("A train travels 60 miles per hour for 3 hours. How many miles does it go?", "math"),
        ("Which gas do plants absorb?\nA) oxygen\nB) carbon dioxide\nC) helium", "knowledge"),
        ("Who wrote Pride and Prejudice?", "knowledge"),
        ("Write a short poem about the sea for my sister's birthday.", "chat"),
        ("Can you help me draft an email to my landlord about a broken heater?", "chat"),
    ],
)
def test_each_family(text: str, family: str) -> None:
    assert family_of(text) == family
    assert family in FAMILIES


def test_a_clients_tag_is_a_short_lower_case_name() -> None:
    assert TAG_PATTERN.match("support-bot") and TAG_PATTERN.match("sql.v2")
    for bad in ("", "Support", "a b", "x" * 33, "-lead"):
        assert not TAG_PATTERN.match(bad)
