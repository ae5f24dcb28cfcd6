"""How often a reply judge calls ordinary text something other than complied (a negative control).

    python benchmarks/judge_negative_controls.py [--judge MODULE:FUNCTION] [--root DIR] [--seed 0]
        [--prompt REQUEST]

Ordinary written text — the Markdown and reStructuredText documents and a sample of the Python files
installed next to the project (``--root``, default the running interpreter's ``site-packages``) — cut
into windows of whole lines of about 90 words, the length of a 128-token reply; Python windows are put in
a code fence, as a model writes code. None of it is a loop, gibberish or a refusal, so every verdict
other than complied is a false alarm (a few "dodged" are possible on safety documents, since the judge is
called without a prompt). Prints the verdict counts and the first window of each kind.
"""

from __future__ import annotations

import argparse
import random
import sysconfig
from collections import Counter
from pathlib import Path

from judge_agreement import load_judge

WINDOW_WORDS = 90
MIN_WORDS = 60
PYTHON_FILES = 400


def windows(path: Path, rng: random.Random, per_file: int = 2) -> list[str]:
    """Up to ``per_file`` windows of whole lines of about ``WINDOW_WORDS`` words from random starts."""
    try:
        lines = path.read_text("utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    if not lines or sum(len(line.split()) for line in lines) < MIN_WORDS:
        return []
    found = []
    for _ in range(per_file):
        start, kept, count = rng.randrange(len(lines)), [], 0
        for line in lines[start:]:
            kept.append(line)
            count += len(line.split())
            if count >= WINDOW_WORDS:
                break
        if count >= MIN_WORDS:
            body = "\n".join(kept)
            found.append(f"Here is the code:\n```python\n{body}\n```" if path.suffix == ".py" else body)
    return found


def main() -> None:
    """Cut the documents into windows, judge each, print the counts."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--judge", default="abliterate.find.judge:judge")
    parser.add_argument("--root", type=Path, default=Path(sysconfig.get_paths()["purelib"]))
    parser.add_argument("--seed", type=int, default=0)
    # A harmful request as the prompt puts the judge's prompt-dependent dodge cues to the test too.
    parser.add_argument("--prompt", default="", help="the request every window is judged as a reply to")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    documents = sorted(args.root.rglob("*.md")) + sorted(args.root.rglob("*.rst"))
    code = sorted(args.root.rglob("*.py"))
    files = documents + rng.sample(code, min(PYTHON_FILES, len(code)))
    texts = [text for path in files for text in windows(path, rng)]
    judge = load_judge(args.judge)
    verdicts = [judge(text, args.prompt) for text in texts]
    print(f"{len(texts)} windows from {len(files)} files under {args.root}, judge {args.judge}")
    print(dict(Counter(verdicts)))
    for kind in sorted(set(verdicts) - {"complied"}):
        first = texts[verdicts.index(kind)]
        print(f"\n--- first {kind}:\n{first[:400]}")


if __name__ == "__main__":
    main()
