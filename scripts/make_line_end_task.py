"""Build the bundled downstream task: given a speech of The Comedy of Errors (the play kept out of training) up to
the middle of a line, pick the true end of that line among four line ends of the same play.

    python scripts/make_line_end_task.py   # writes data/tasks/comedy_line_end.jsonl, the one in the repository

Each item's context is the speaker's name, up to CONTEXT_LINES lines of the speech before, and the first half
(in words) of a line of at least MIN_WORDS words; its choices are the rest of that line and the second halves of
three other lines of the play of as many words, drawn at random, each starting with its space, in a random order
(seeded: the file is the same every time). Chance is 1/4. The lines are the play's own: the model has seen none of them in training.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PLAY = REPO / "data" / "shakespeare_eval" / "comedy_of_errors.txt"
OUT = REPO / "data" / "tasks" / "comedy_line_end.jsonl"
CONTEXT_LINES = 2  # lines of the speech before the one cut (fewer where the speech has just begun)
MIN_WORDS = 4
CHOICES = 4
SEED = 0
SPEAKER = re.compile(r"^[A-Z][A-Z .,']+\.$")  # "AEGEON.", "ANTIPHOLUS OF SYRACUSE."


def speeches(text: str) -> list[tuple[str, list[str]]]:
    """(speaker line, its lines) of each speech: a speaker's name alone on a line, then lines up to a blank one;
    stage directions ([Exit.], Enter ...) are left out."""
    found = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line.rstrip() for line in block.splitlines() if line.strip()]
        if len(lines) >= 2 and SPEAKER.match(lines[0]):
            spoken = [line for line in lines[1:] if not line.lstrip().startswith(("[", "Enter ", "Exit", "Exeunt"))]
            found.append((lines[0], spoken))
    return found


def items(text: str, seed: int) -> list[dict]:
    """An item per line of four words or more: cut in the middle, at a space, its end is the continuation."""
    rng = random.Random(seed)
    found = speeches(text)
    halves = [(line, *cut(line)) for _, lines in found for line in lines if len(line.split()) >= MIN_WORDS]
    ends = sorted({end for _, _, end in halves})
    made, k = [], 0
    for speaker, lines in found:
        for k, line in enumerate(lines):
            if len(line.split()) < MIN_WORDS:
                continue
            start, end = cut(line)
            context = "\n".join([speaker, *lines[max(0, k - CONTEXT_LINES):k], start])
            # Distractors of the same number of words: then length alone does not give the answer away.
            alike = [other for other in ends if other != end and len(other.split()) == len(end.split())]
            others = rng.sample(alike, CHOICES - 1)
            answer = rng.randrange(CHOICES)
            made.append({"context": context, "choices": others[:answer] + [end] + others[answer:], "answer": answer})
    return made


def cut(line: str) -> tuple[str, str]:
    """(the line's first half of its words, the rest with the space before it)."""
    words = line.split(" ")
    half = len(words) // 2
    return " ".join(words[:half]), " " + " ".join(words[half:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(OUT), help="the JSONL file to write (default: %(default)s)")
    args = parser.parse_args(argv)
    made = items(PLAY.read_text(encoding="utf-8"), SEED)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(item) + "\n" for item in made), encoding="utf-8")
    print(f"{out}: {len(made)} items of {CHOICES} choices (chance {1 / CHOICES:.0%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
