"""The King James Bible as a plain-text corpus for the benchmarks: one chapter per line (sakd's .txt format,
one document per line), verses joined by a space, references stripped.

    apt-get install bible-kjv          # Debian; its `bible` program reads the compressed bible-kjv-text
    python benchmarks/kjv_text.py kjv.txt

``bible -f`` prints every verse on one line, prefixed with its reference ("Ge1:1 In the beginning ...");
the 66 books give 1,189 chapters and 31,102 verses (checked).
"""

from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path

VERSE = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)$")
EXPECTED_CHAPTERS, EXPECTED_VERSES = 1189, 31102


def chapters(bible: str = "bible") -> list[str]:
    """Every chapter's text, in canonical order."""
    out = subprocess.run(
        [bible, "-f", "Genesis 1:1-Revelation 22:21"], check=True, capture_output=True, text=True
    ).stdout
    texts: list[list[str]] = []
    current, verses = None, 0
    for line in filter(str.strip, out.splitlines()):
        m = VERSE.match(line)
        if m is None:
            raise ValueError(f"unexpected line from `bible -f`: {line[:80]!r}")
        key = (m.group(1), m.group(2))
        if key != current:
            texts.append([])
            current = key
        texts[-1].append(" ".join(m.group(4).split()))  # a few verses hold double or trailing spaces
        verses += 1
    if (len(texts), verses) != (EXPECTED_CHAPTERS, EXPECTED_VERSES):
        raise ValueError(
            f"expected {EXPECTED_CHAPTERS} chapters / {EXPECTED_VERSES} verses, got {len(texts)} / {verses}"
        )
    return [" ".join(t) for t in texts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--bible", default="bible", help="the `bible` program (Debian package bible-kjv)")
    args = parser.parse_args()
    args.output.write_text("\n".join(chapters(args.bible)) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
