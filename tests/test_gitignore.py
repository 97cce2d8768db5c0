"""Every output path that the README, the docs, the configs and the scripts' usage suggest is ignored by git (or is a
file the repository keeps on purpose, such as data/tokenizer/ made again by its documented command)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from conftest import REPO

# Where a command writes: --output_dir, output_dir:, --out (prepare_data, train_tokenizer), -o (plot_runs),
# the export's OUT_DIR, sbatch's log and a screenshot.
OUTPUT = re.compile(r"(?:--output_dir[= ]|^output_dir: *|--out[= ]|(?<![\w-])-o |export_checkpoint\.py \S+ |"
                    r"#SBATCH --output=|--screenshot=)([\w./%-]+)", re.MULTILINE)


def suggested_outputs() -> dict[str, str]:
    """Each relative output path the docs give (a name with a / or a dot, not a placeholder), with a file that
    gives it."""
    files = [REPO / "README.md", *REPO.glob("docs/*.md"), *REPO.glob("configs/**/*.yaml"), *REPO.glob("scripts/*")]
    found = {}
    for file in files:
        for match in OUTPUT.finditer(file.read_text(encoding="utf-8")):
            path = match.group(1).rstrip(".")
            if ("/" in path or "." in path) and not path.startswith("/"):
                found.setdefault(path, str(file.relative_to(REPO)))
    return found


def git(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=REPO, input=stdin, capture_output=True, text=True, timeout=60)


def test_every_output_path_the_docs_suggest_is_ignored_by_git():
    if shutil.which("git") is None or git("rev-parse", "--is-inside-work-tree").stdout.strip() != "true":
        pytest.skip("not a git checkout")
    outputs = suggested_outputs()
    assert {"exported/step_600", "runs/default", "data/prepared/shakespeare", "curves.png"} <= set(outputs)
    # As a file and as a folder: `exported/` matches only a folder, and the path may be either.
    candidates = [name for path in outputs for name in (path, f"{path}/x")]
    ignored = set(git("check-ignore", "--no-index", "--stdin", stdin="\n".join(candidates)).stdout.split())
    tracked = set(git("ls-files", "--", *outputs).stdout.split())
    for path, where in outputs.items():
        kept = any(name == path or name.startswith(path + "/") for name in tracked)
        assert kept or path in ignored or f"{path}/x" in ignored, f"{path} (suggested in {where}) is not in .gitignore"
