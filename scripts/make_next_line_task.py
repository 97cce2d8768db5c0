"""Build the bundled downstream task: given the start of a speech of The Comedy of Errors (the play kept out of
training), pick its true next line among four lines of the same play.

    python scripts/make_next_line_task.py     # writes data/tasks/comedy_next_line.jsonl (the one in the repository)

Each item's context is the speaker's name and up to CONTEXT_LINES lines of the speech so far; its choices are the
line that follows and three other lines of the play drawn at random, in a random order (seeded: the file is the
same every time). Chance is 1/4. The lines are the play's own, so the model has seen none of them in training.
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
OUT = REPO / "data" / "tasks" / "comedy_next_line.jsonl"
CONTEXT_LINES = 2  # lines of the speech before the one to pick (fewer where the speech has just begun)
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
    rng = random.Random(seed)
    found = speeches(text)
    every_line = sorted({line for _, lines in found for line in lines})
    made = []
    for speaker, lines in found:
        for k in range(1, len(lines)):
            context = "\n".join([speaker, *lines[max(0, k - CONTEXT_LINES):k]]) + "\n"
            others = rng.sample([line for line in every_line if line != lines[k]], CHOICES - 1)
            answer = rng.randrange(CHOICES)
            made.append({"context": context, "choices": others[:answer] + [lines[k]] + others[answer:],
                         "answer": answer})
    return made


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
