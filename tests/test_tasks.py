"""Downstream tasks: the scorer against a token-by-token loop, the metrics against hand-computed values, the Hub
adapters on files in the Hub's columns, and bad task input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import QUIET, REPO, TINY_LLAMA, fresh_accelerate_state, read_metrics, run_in_process
from pretrain.config import load_config
from pretrain.data import load_tokenizer
from pretrain.task_scoring import evaluate_tasks, rows_of, score_batch, task_sums
from pretrain.tasks import Item, Task, load_task, tokenized
from test_evaluation import tiny_llama

FIXTURES = REPO / "tests" / "fixtures" / "tasks"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(REPO / "data/tokenizer"))


def loop_log_likelihood(model, context: list[int], choice: list[int]) -> tuple[float, bool]:
    """log P(choice | context) one token at a time, each from its own forward pass over everything before it."""
    total, greedy, ids = 0.0, True, context + choice
    for j in range(len(context), len(ids)):
        with torch.no_grad():
            logits = model(torch.tensor([ids[:j]])).logits[0, -1].double()
        total += torch.log_softmax(logits, dim=-1)[ids[j]].item()
        greedy = greedy and int(logits.argmax()) == ids[j]
    return total, greedy


ITEMS = [("The cat sa", ["t on the mat.", "ng a song."], 0),  # the choice crosses a word (and token) boundary
         ("ROMEO:\nBut soft, what light", [" through yonder window breaks?", " is this?", " fades"], 1),
         ("Ça va? Très", [" bien 🙂", "-bien"], 0)]


def test_the_scorer_equals_a_token_by_token_loop_in_float64(tokenizer):
    task = Task("t", [tokenized("item", item, tokenizer, seq_len=64) for item in ITEMS])
    # Joined, "sat" is one token: the choice's first token crosses what would be a token boundary of the joint text.
    joint = tokenizer("The cat sat on the mat.", add_special_tokens=False)["input_ids"]
    assert joint[:len(task.items[0].context)] != task.items[0].context
    model = tiny_llama(len(tokenizer))
    rows = rows_of(task, seq_len=64)
    scores = score_batch(model, rows, torch.device("cpu"))  # all rows in one padded batch
    for (i, c, _, _), (ll, greedy) in zip(rows, scores):
        item = task.items[i]
        expected, expected_greedy = loop_log_likelihood(model, item.context, item.choices[c])
        assert ll == pytest.approx(expected, rel=1e-10, abs=1e-10)
        assert greedy == expected_greedy
    # Through evaluate_tasks, several forward passes (a small budget): the same scores give the same metrics.
    fresh_accelerate_state()
    from accelerate import Accelerator
    row = evaluate_tasks(Accelerator(cpu=True), model, [task], seq_len=64, micro_batch_size=1)
    by_item = {(i, c): s for (i, c, _, _), s in zip(rows, scores)}
    assert row == pytest.approx(
        {"eval/t/acc": task_sums(task, by_item, range(3))[1] / 3, "eval/t/acc_norm": task_sums(task, by_item, range(3))[2] / 3,
         "eval/t/bpb": task_sums(task, by_item, range(3))[3] / task_sums(task, by_item, range(3))[4], "eval/t/items": 3},
        rel=1e-12)
    assert row["eval/t/bpb"] == pytest.approx(
        -sum(loop_log_likelihood(model, it.context, it.choices[it.answer])[0] for it in task.items) / math.log(2)
        / sum(len(choices[answer].encode()) for _, choices, answer in ITEMS), rel=1e-10)


def test_accuracy_length_normalisation_and_bits_per_byte_against_hand_computed_values():
    items = [Item([1], [[2], [3]], choice_bytes=[2, 10], answer=1),  # -10 > -12; per byte -5 < -1.2
             Item([1], [[2], [3], [4]], choice_bytes=[4, 4, 8], answer=0)]  # -4 best; per byte -1 > -1.25 > -2
    task = Task("t", items)
    scores = {(0, 0): (-10.0, False), (0, 1): (-12.0, False),
              (1, 0): (-4.0, False), (1, 1): (-8.0, False), (1, 2): (-10.0, False)}
    n, acc, acc_norm, bits, text_bytes = task_sums(task, scores, range(2))
    assert (n, acc, acc_norm) == (2, 1, 2)
    assert bits == pytest.approx((12 + 4) / math.log(2))
    assert text_bytes == 10 + 4
    cloze = Task("c", [Item([1], [[2, 3]], [6], 0), Item([1], [[4]], [3], 0)])
    n, acc, _, bits, text_bytes = task_sums(cloze, {(0, 0): (-3.0, True), (1, 0): (-1.0, False)}, range(2))
    assert (n, acc, bits, text_bytes) == (2, 1, pytest.approx(4 / math.log(2)), 9)


@pytest.mark.parametrize("name, context, choices, answer", [
    ("hellaswag", "Roof shingle removal: A man is sitting on a roof. He",
     [" is using wrap to wrap a pair of skis.", " is ripping level tiles off.", " is holding a rubik's cube.",
      " starts pulling up roofing on a roof."], 3),
    ("arc_easy", "Question: Which technology was developed most recently?\nAnswer:",
     [" cellular telephone", " television", " refrigerator"], 0),
    ("piqa", "Question: To clean a pan,\nAnswer:", [" scrub it with soap and water.", " scrub it with sand and oil."], 0),
    ("lambada", "Give me a minute to change and I'll meet you at the docks.\" She'd forced those words through her "
                "teeth. \"No need to change. We won't be that long.\" Shane gripped her arm and started leading her to "
                "the", [" dock"], 0)])
def test_hub_adapters_read_the_hubs_columns(tokenizer, name, context, choices, answer):
    cfg = load_config(REPO / "configs/default.yaml", {"eval.task_items": 0})
    task = load_task(f"{name}={FIXTURES / (name + '.jsonl')}", cfg, tokenizer)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    wanted = Item(encode(context), [encode(c) for c in choices], [len(c.encode()) for c in choices], answer)
    assert task.name == name and len(task.items) == 2 and wanted in task.items
    assert task.cloze == (name == "lambada")


def test_hellaswag_cleans_wikihow_marks(tokenizer):
    cfg = load_config(REPO / "configs/default.yaml", {"eval.task_items": 0})
    task = load_task(f"hellaswag={FIXTURES / 'hellaswag.jsonl'}", cfg, tokenizer)
    decoded = {tokenizer.decode(item.context) for item in task.items}
    assert "Health: How to rest a cold. Stay in bed. " in decoded or "Health: How to rest a cold. Stay in bed." in decoded


def test_task_items_keeps_the_first_after_a_seeded_shuffle(tokenizer, tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps({"context": f"n{i}", "choices": ["a", "b"], "answer": i % 2}) + "\n"
                            for i in range(50)))
    picks = [[tokenizer.decode(item.context) for item in load_task(str(path), load_config(
        REPO / "configs/default.yaml", {"eval.task_items": n}), tokenizer).items] for n in (10, 10, 20)]
    assert picks[0] == picks[1] == picks[2][:10] and picks[0] != [f"n{i}" for i in range(10)]


def bad(tmp_path, lines: list) -> str:
    path = tmp_path / f"task{len(list(tmp_path.glob('task*')))}.jsonl"
    path.write_text("".join((json.dumps(line) if not isinstance(line, str) else line) + "\n" for line in lines))
    return str(path)


@pytest.mark.parametrize("case, needle", [
    ("unknown", "'squad' is not a task"),
    ("missing", "line 2 has no 'answer'"),
    ("out_of_range", "answer 2 is not an index into its 2 choices"),
    pytest.param(*("negative", "answer -1 is not an index"), marks=pytest.mark.slow),  # another case of a class above
    ("empty", "holds no items"),
    pytest.param(*("no_file", "cannot read"), marks=pytest.mark.slow),  # another case of a class above
    pytest.param(*("not_json", "line 1 is not a JSON object"), marks=pytest.mark.slow),  # another case of a class above
    pytest.param(*("empty_choice", "choices is not a list of non-empty strings"), marks=pytest.mark.slow),  # another case of a class above
    pytest.param(*("mixed", "mixes items of one choice"), marks=pytest.mark.slow),  # another case of a class above
    pytest.param(*("adapter_columns", "is not in Rowan/hellaswag's columns"), marks=pytest.mark.slow),  # another case of a class above
])
def test_bad_task_input_is_one_error_line_before_training(tmp_path, case, needle):
    good = {"context": "a", "choices": ["b", "c"], "answer": 0}
    spec = {"unknown": "squad",
            "missing": bad(tmp_path, [good, {"context": "a", "choices": ["b"]}]),
            "out_of_range": bad(tmp_path, [{**good, "answer": 2}]),
            "negative": bad(tmp_path, [{**good, "answer": -1}]),
            "empty": bad(tmp_path, ["", "  "]),
            "no_file": str(tmp_path / "absent.jsonl"),
            "not_json": bad(tmp_path, ["{not json"]),
            "empty_choice": bad(tmp_path, [{**good, "choices": ["b", ""]}]),
            "mixed": bad(tmp_path, [good, {**good, "choices": ["b"]}]),
            "adapter_columns": f"hellaswag={FIXTURES / 'piqa.jsonl'}"}[case]
    # (each case's file has its own name: the mapping above writes them all)
    out = tmp_path / "run"
    result = run_in_process([*TINY_LLAMA, *QUIET, "--train.max_steps=2", f"--output_dir={out}",
                             "--tracking.backends=[]", f"--eval.tasks=[{json.dumps(spec)}]"])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: eval.tasks: ") and needle in lines[0], result.stderr
    assert not out.exists()
