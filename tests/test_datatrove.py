"""datatrove's tokenized output as training data: the bundled corpus end to end, and each kind of bad folder."""

from __future__ import annotations

import importlib.util
import re
import shutil

import numpy as np
import pytest

from conftest import QUIET, REPO, TINY_LLAMA, prepare_data, read_metrics, run_in_process
from pretrain.config import DataConfig
from pretrain.data.stream import load_tokenizer, micro_batch_stream
from pretrain.errors import ConfigError
from pretrain.data.shards import open_token_shards

pytest.importorskip("datatrove")
TOKENIZER = str(REPO / "data" / "tokenizer")


def fake_folder(path, tokens, name=f"{TOKENIZER}/tokenizer.json", size=2, parts=(".index", ".metadata")):
    """A datatrove tokenized folder written by hand, as its DocumentTokenizer lays it out: one document a list."""
    path.mkdir()
    stream = [t for document in tokens for t in document]
    (path / "00000_unshuffled.ds").write_bytes(np.array(stream, dtype=f"<u{4 if size == 4 else 2}").tobytes())
    if ".index" in parts:
        (path / "00000_unshuffled.ds.index").write_bytes(np.cumsum([len(d) for d in tokens], dtype="<u8").tobytes())
    if ".metadata" in parts:
        (path / "00000_unshuffled.ds.metadata").write_text(f"{name}|{size}\n{len(stream)}\n")
    return str(path)


def first_error(path, tokenizer=TOKENIZER):
    with pytest.raises(ConfigError) as caught:
        micro_batch_stream(DataConfig(path=path, tokenizer=tokenizer, seq_len=4), load_tokenizer(tokenizer),
                           micro_batch_size=1, rank=0, world_size=1)
    return str(caught.value)


def test_a_hand_written_folder_reads_as_its_token_stream(tmp_path):
    folder = fake_folder(tmp_path / "dt", [[5, 6, 7, 0], [8, 9, 0]])
    assert open_token_shards(folder).read(0, 7).tolist() == [5, 6, 7, 0, 8, 9, 0]
    windows = [mb.batch["input_ids"][0].tolist() + mb.batch["labels"][0, -1:].tolist() for mb in micro_batch_stream(
        DataConfig(path=folder, tokenizer=TOKENIZER, seq_len=3, shuffle=False, repeat=False),
        load_tokenizer(TOKENIZER), micro_batch_size=1, rank=0, world_size=1)]
    assert windows == [[5, 6, 7, 0], [0, 8, 9, 0]]  # windows of seq_len + 1 overlapping by one


@pytest.mark.parametrize("case, build, message", [
    ("no index", dict(parts=(".metadata",)), r"datatrove file '.*00000_unshuffled.ds' has no 00000_unshuffled.ds.index "
                                             r"beside it; re-run the datatrove pipeline"),
    ("no metadata", dict(parts=(".index",)), r"has no 00000_unshuffled.ds.metadata beside it"),
    ("metadata without a token size", dict(size=3), r"metadata '.*00000_unshuffled.ds.metadata' starts with "
                                                    r"'.*tokenizer.json\|3', not the tokenizer's name and token size"),
    ("another tokenizer's name", dict(name="gpt2"), r"^data.tokenizer: '.*data/tokenizer' \(4096 tokens, 2-byte ids\) is not "
                                                    r"the tokenizer 'gpt2' \(2-byte ids\) that datatrove tokenized"),
    ("another token size", dict(size=4), r"^data.tokenizer: .* is not the tokenizer .*\(4-byte ids\)"),
])
def test_a_bad_datatrove_folder_is_one_line(tmp_path, case, build, message):
    folder = fake_folder(tmp_path / "dt", [[5, 6, 7, 8, 9, 0]] * 3, **build)
    assert re.search(message, first_error(folder))


def test_a_truncated_token_file_and_a_folder_that_is_neither_are_refused(tmp_path):
    folder = fake_folder(tmp_path / "dt", [[5, 6, 7, 8, 9, 0]] * 3)
    with open(tmp_path / "dt" / "00000_unshuffled.ds", "r+b") as f:
        f.truncate(10)  # 5 of the 18 tokens the index counts
    assert "holds 5 tokens but its index ends at 18: truncated" in first_error(folder)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.md").write_text("not data\n")
    assert first_error(str(tmp_path / "other")).endswith(
        "holds no .txt, .text, .jsonl, .json, .parquet files (nor token shards from scripts/prepare_data.py or "
        "datatrove)")


def test_a_copy_of_the_tokenizer_elsewhere_is_another_tokenizer_by_name(tmp_path):
    folder = fake_folder(tmp_path / "dt", [[5, 6, 7, 8, 9, 0]] * 3)
    shutil.copytree(TOKENIZER, tmp_path / "tok")  # same vocabulary, but not the name datatrove recorded
    assert "is not the tokenizer" in first_error(folder, str(tmp_path / "tok"))


@pytest.mark.slow
def test_the_bundled_corpus_prepared_by_datatrove_trains_and_matches_prepare_data(tmp_path):
    # The seven plays (one document each, in data.path's file order), tokenized by datatrove's pipeline in 2 tasks.
    plays = sorted((REPO / "data" / "shakespeare").glob("*.txt"))
    folder = str(tmp_path / "datatrove")
    script = importlib.util.spec_from_file_location("prepare_datatrove", REPO / "scripts" / "prepare_datatrove.py")
    prepare_datatrove = importlib.util.module_from_spec(script)
    script.loader.exec_module(prepare_datatrove)
    assert prepare_datatrove.main(["--input", str(REPO / "data" / "shakespeare"), "--out", folder, "--tokenizer",
                                   TOKENIZER, "--tasks", "2"]) == 0
    assert prepare_data("--out", str(tmp_path / "shards"), f"--data.path={REPO / 'data' / 'shakespeare'}") == 0
    ours, theirs = (open_token_shards(p) for p in (str(tmp_path / "shards"), folder))
    ours, theirs = ours.read(0, ours.total), theirs.read(0, theirs.total)
    eos = load_tokenizer(TOKENIZER).eos_token_id
    # prepare_data.py cuts the plays (over 8 KB) into pieces, each ended by EOS; datatrove ends each play only.
    # Cut between non-spaces, the pieces keep the play's tokens: without EOS the streams are equal.
    assert (theirs == eos).sum() == len(plays) and (ours == eos).sum() > 10 * len(plays)
    assert np.array_equal(ours[ours != eos], theirs[theirs != eos])
    out = tmp_path / "run"
    result = run_in_process([*TINY_LLAMA, *QUIET, f"--data.path={folder}", "--train.max_steps=3", "--eval.every=0",
                             "--tracking.backends=[]", f"--output_dir={out}"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert [r["tokens"] for r in read_metrics(out)] == [16 * 128 * s for s in (1, 2, 3)]
