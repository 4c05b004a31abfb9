"""Task family of a prompt (chat, code, math, knowledge) from its text, by a few fixed rules.

Reports on stored traffic group requests by family, so an operator sees which kind of
work a student handles well. The tagger is deterministic and cheap (a handful of regex
scans over the first few thousand characters): it runs over every stored request in
`triage replay` and `triage export`, never on the request path. A client that knows its
own workload better sends the `x-triage-family` header, and that tag wins.

The rules, first match wins:

- code: a code fence, a function or class definition, or asking for a function, a
  program, a query or a script in a named language;
- knowledge: a multiple-choice question (lettered or numbered options, "which of the
  following"), or a short factual question with no numbers;
- math: LaTeX, an equation, or a math word together with numbers;
- chat: everything else (writing, advice, summaries, conversation).

`bench/family_tagger.py` measures it against the labelled families of the shared
training data.
"""

from __future__ import annotations

import re

__all__ = ["FAMILIES", "TAG_PATTERN", "family_of"]

FAMILIES: tuple[str, ...] = ("chat", "code", "math", "knowledge")
# What a client may send as its own tag: a short lower-case name ("support-bot", "sql").
TAG_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,31}$")

# Long prompts keep their ask at the start; the rules only read this much.
_HEAD_CHARS = 4_000

_CODE_STRONG = re.compile(
    r"^[ \t]*(?:def|async def|class|function|fn|func|public|private|static)[ \t]+\w+[ \t]*[(:<{]"
    r"|^[ \t]*#include\b|^[ \t]*(?:import|from)[ \t]+[\w.]+(?:[ \t]+import\b|[ \t]*$)"
    r"|^[ \t]*(?:SELECT|INSERT|UPDATE|CREATE TABLE)\b",
    re.MULTILINE,
)
_CODE_MARKS = ("```", "console.log(", "=> {", "();", "};")
_LANGUAGES = frozenset(
    "python javascript typescript java c++ c# golang rust sql bash html css regex numpy pandas react "
    "dockerfile kotlin swift php ruby lua matlab haskell scala perl".split()
)
_CODE_VERBS = frozenset("write implement create generate fix debug refactor optimize optimise".split())
_CODE_NOUNS = frozenset("function program script class method code query snippet api endpoint".split())
_CHOICES = re.compile(r"^[ \t]*(?:\(?[A-Ea-e][).:]|Option \d:?)[ \t]+\S", re.MULTILINE)
# (matched on the lower-cased text)
_WHICH = re.compile(
    r"(?:^|[.?!:] +)which (?:is|are|of|one|statement|process|factor|property|term|best|most|would|"
    r"should|can|could|will)\b",
    re.MULTILINE,
)
_MC_PHRASES = ("which of the following", "choose the best", "choose the correct")
_FILL_IN = re.compile(r"(?:^|\s)_(?:\s|[.,?!]|$)")
_LATEX = re.compile(r"\$[^$\n]+\$|\\(?:frac|sqrt|cdot|times|le|ge|pi|sum|int|text|circ|dfrac)\b|\\\[|\\\(")
_EQUATION = re.compile(r"\d *[-+*/^×÷=<>] *\(?\d|\b[a-z] *[=^] *[-\d(]|\d *%")
# Phrases that mark a math problem even without a digit in it ("two fair dice").
_MATH_PHRASES = (
    "express your answer",
    "probability",
    "solve for",
    "simplify",
    "how many ways",
    "how many different",
    "how many positive",
    "how many integers",
    "what is the value",
    "what is the sum",
    "what is the product",
    "what is the remainder",
    "common fraction",
    "prove that",
)
# Words that make a prompt with numbers in it a math problem.
_MATH_WORDS = frozenset(
    "solve calculate compute evaluate simplify many much equation integer integers prime divisible "
    "remainder probability percent fraction ratio average sum product digit digits triangle circle "
    "radius polynomial derivative integral matrix real expression dollars cents hour miles total "
    "value area perimeter volume smallest largest greatest least".split()
)
_WORD = re.compile(r"[a-z][a-z+#]*")
_DIGIT = re.compile(r"\d")
_QUESTION_WORDS = frozenset(
    "what who whom when where which why how is are was were does do did can define name".split()
)
_CHAT_WORDS = frozenset(
    "write draft compose rewrite summarize summarise translate describe imagine pretend act suggest "
    "recommend tips ideas story poem essay email letter blog opinion you your my me i help should".split()
)
# A factual question is short; longer questions are usually requests for writing or advice.
_FACT_CHARS = 300


def family_of(text: str) -> str:
    """The task family of a prompt's text: one of `FAMILIES`."""
    head = text[:_HEAD_CHARS]
    lower = head.lower()
    words = frozenset(_WORD.findall(lower))
    if (
        any(mark in head for mark in _CODE_MARKS)
        or _CODE_STRONG.search(head)
        or words & _LANGUAGES
        or (words & _CODE_VERBS and words & _CODE_NOUNS)
    ):
        return "code"
    if (
        len(_CHOICES.findall(head)) >= 2
        or any(p in lower for p in _MC_PHRASES)
        or _WHICH.search(lower)
        or _FILL_IN.search(head)
    ):
        return "knowledge"
    if _LATEX.search(head) or _EQUATION.search(lower) or any(p in lower for p in _MATH_PHRASES):
        return "math"
    has_digits = _DIGIT.search(head) is not None
    if has_digits and words & _MATH_WORDS:
        return "math"
    stripped = head.strip()
    if len(stripped) <= _FACT_CHARS and not has_digits and not words & _CHAT_WORDS:
        first = _WORD.match(stripped.lower())
        if (first is not None and first.group() in _QUESTION_WORDS) or not stripped.endswith(("?", ".", "!")):
            return "knowledge"
    return "chat"
