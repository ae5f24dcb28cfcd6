"""Degenerate replies — empty, looping or gibberish (``abliterate.find.judge`` asks once declines are read).

A greedy reply that falls into a loop usually keeps looping until the token limit. Besides short character
loops ("!!!!…"), two measures on the reply's words (prose words and numbers without list markers, so "1."
and "2." do not break a repeat; code blocks and table rows token for token), each chosen because ordinary
answers — lists whose items share a template, code with repeated structure, a poem with a refrain, figures
year by year — do not reach it:

* **a periodic stretch**: ``PERIODIC_WORDS`` words or more that each equal the word one period before
  them, one whole unit repeated or more (``periodic_run``): the same sentence or lines over and over. A
  list item that reuses the previous item's template breaks the period at its new word; a refrain comes
  back after a verse, not right after itself;
* **a stale end**: the reply's last ``STALE_WORDS`` words or more bring no word it had not used before,
  and use few distinct words (each ``STALE_REUSE`` times or more on average, ``stale_tail``): a phrase
  that stutters or grows ("friend's friend's friend's …") or two list lines that alternate. A list whose
  items share a template still names a new thing in each item; code blocks and table rows, whose
  vocabulary is small by nature, are left out of this measure.
"""

from __future__ import annotations

import re

# A character loop ("!!!!…", "ha ha ha …") covering this fraction of the reply.
LOOP_COVERAGE = 0.5
# A periodic stretch: at least this many words equal the word one period before them.
PERIODIC_WORDS = 16
# The same in code blocks and table rows, in tokens: identical lines are ordinary there (the equal rows
# of a mask matrix, closing braces), so a loop must run longer — about four repeated lines of code.
PERIODIC_TOKENS = 32
# The longest period looked for, in words (a repeated paragraph of ~100 words).
MAX_PERIOD = 100
# A stale end: this many words with no new word, each distinct word used this often on average.
STALE_WORDS = 20
STALE_REUSE = 3.0
# Gibberish: fewer than this fraction of the reply's tokens are words.
MIN_WORD_FRACTION = 0.4

_WORD = re.compile(r"[^\W\d_]{2,}|[\u4e00-\u9fff\u3040-\u30ff\uac00-\ud7af]")
# A word or number of prose ("friend's" one word), and a list item's marker ("1.", "2)", "-") before it.
_PROSE_WORD = re.compile(r"\w+(?:'\w+)*")
_LIST_MARKER = re.compile(r"^[ \t]*(?:\d+[.)]|[-*•]|#+)[ \t]+", re.MULTILINE)
# A fenced code block (closed, or cut off by the token limit) or a table row.
_STRUCTURED = re.compile(r"```.*?(?:```|\Z)|^[ \t]*\|[^\n]*", re.DOTALL | re.MULTILINE)
_CHAR_LOOP = re.compile(r"(.{1,12}?)\1{7,}", re.DOTALL)


def degenerate_reason(text: str) -> str | None:
    """Why a (normalized) reply is degenerate — ``"empty"``, ``"loop"`` or ``"gibberish"`` — or ``None``.

    Args:
        text: the reply, normalized by ``abliterate.find.judge.normalize``.

    Returns:
        The reason, or ``None`` for a reply that is none of these.
    """
    if not text.strip():
        return "empty"
    compact = text.replace("\n", " ")
    loops = sum(len(match.group(0)) for match in _CHAR_LOOP.finditer(compact))
    if loops >= LOOP_COVERAGE * len(compact) and len(compact) >= 40:
        return "loop"
    words = compact.split()
    # Prose is read as words and numbers, without list markers, so "1. x" and "2. x" repeat while "sales
    # grew 5 % in 2019" and "… 7 % in 2020" do not. Code and tables repeat their structure by nature, so a
    # loop there must repeat them token for token, numbers and symbols included.
    prose = _PROSE_WORD.findall(_LIST_MARKER.sub("", _STRUCTURED.sub("\n", text)))
    structured = " ".join(_STRUCTURED.findall(text)).split()
    if periodic_run(prose)[0] >= PERIODIC_WORDS or periodic_run(structured)[0] >= PERIODIC_TOKENS:
        return "loop"
    # Tables and code use few distinct words by nature (a truth table is all "true" and "false").
    stale, distinct = stale_tail(prose)
    if stale >= STALE_WORDS and stale >= STALE_REUSE * distinct:
        return "loop"
    if "```" not in text and len(words) >= 8:
        wordy = sum(1 for word in words if _WORD.search(word))
        if wordy < MIN_WORD_FRACTION * len(words):
            return "gibberish"
    return None


def periodic_run(words: list[str]) -> tuple[int, int]:
    """The longest stretch of ``words`` that repeats the words one period before it, a whole period or more.

    Args:
        words: the reply's words.

    Returns:
        ``(length, period)``: ``length`` consecutive words each equal the word ``period`` places before
        them, with ``length >= period``; ``(0, 0)`` when no period repeats whole.
    """
    best = (0, 0)
    for period in range(1, min(MAX_PERIOD, len(words) // 2) + 1):
        length = 0
        for i in range(period, len(words)):
            length = length + 1 if words[i] == words[i - period] else 0
            if length >= period and length > best[0]:
                best = (length, period)
    return best


def stale_tail(words: list[str]) -> tuple[int, int]:
    """The reply's stale end: the longest run of last words that are all words used before.

    Args:
        words: the reply's words.

    Returns:
        ``(length, distinct)``: how many last words bring no new word, and how many distinct words they use.
    """
    seen: set[str] = set()
    length = 0
    for word in words:
        length = length + 1 if word in seen else 0
        seen.add(word)
    return length, len(set(words[len(words) - length :])) if length else 0
