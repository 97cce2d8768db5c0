"""Downstream tasks: the scorer against a token-by-token loop, the metrics against hand-computed values, the Hub
adapters on files in the Hub's columns, and bad task input."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import subprocess

import pytest
import torch
from accelerate import Accelerator

from conftest import (QUIET, REPO, TINY_LLAMA, fresh_accelerate_state, read_metrics, run_accelerate_launch,
                      run_in_process)
from pretrain.config import load_config
from pretrain.plots import build_figure, read_runs
from pretrain.data.stream import load_tokenizer
from pretrain.evaluation.task_scoring import evaluate_tasks, rows_of, score_batch, task_sums
from pretrain.evaluation.tasks import Item, Task, load_task, tokenized
from test_evaluation import tiny_llama
from test_trackers import tensorboard_rows

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
    # Through evaluate_tasks, in several forward passes (a budget of 64 tokens): the metrics of the loop's scores.
    loop = [[loop_log_likelihood(model, item.context, choice)[0] for choice in item.choices] for item in task.items]
    text_bytes = [[len(choice.encode()) for choice in choices] for _, choices, _ in ITEMS]
    answers = [answer for _, _, answer in ITEMS]
    best = lambda values: values.index(max(values))
    fresh_accelerate_state()
    row = evaluate_tasks(Accelerator(cpu=True), model, [task], seq_len=64, micro_batch_size=1)
    assert row == pytest.approx({
        "eval/t/acc": sum(best(lls) == a for lls, a in zip(loop, answers)) / 3,
        "eval/t/acc_norm": sum(best([ll / b for ll, b in zip(lls, bs)]) == a
                               for lls, bs, a in zip(loop, text_bytes, answers)) / 3,
        "eval/t/bpb": -sum(lls[a] for lls, a in zip(loop, answers)) / math.log(2)
        / sum(bs[a] for bs, a in zip(text_bytes, answers)),
        "eval/t/items": 3}, rel=1e-10)


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
    ("piqa", "Question: To clean a pan,\nAnswer:",
     [" scrub it with soap and water.", " scrub it with sand and oil."], 0),
    ("lambada", "Give me a minute to change and I'll meet you at the docks.\" She'd forced those words through her "
                "teeth. \"No need to change. We won't be that long.\" Shane gripped her arm and started leading her to "
                "the", [" dock"], 0)])
def test_hub_adapters_read_the_hubs_columns(tokenizer, name, context, choices, answer):
    task = load_task(f"{name}={FIXTURES / (name + '.jsonl')}", 0, 128, tokenizer)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    wanted = Item(encode(context), [encode(c) for c in choices], [len(c.encode()) for c in choices], answer)
    assert task.name == name and len(task.items) == 2 and wanted in task.items
    assert task.cloze == (name == "lambada")


def test_hellaswag_cleans_wikihow_marks(tokenizer):
    task = load_task(f"hellaswag={FIXTURES / 'hellaswag.jsonl'}", 0, 128, tokenizer)
    texts = {(tokenizer.decode(item.context), tokenizer.decode(item.choices[0])) for item in task.items}
    assert ("Health: How to rest a cold. Stay in bed.", " Sleep for as long as you can.") in texts


def test_task_items_keeps_the_first_after_a_seeded_shuffle(tokenizer, tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps({"context": f"n{i}", "choices": ["a", "b"], "answer": i % 2}) + "\n"
                            for i in range(50)))
    picks = [[tokenizer.decode(item.context) for item in load_task(str(path), n, 128, tokenizer).items]
             for n in (10, 10, 20)]
    assert picks[0] == picks[1] == picks[2][:10] and picks[0] != [f"n{i}" for i in range(10)]


def bad(tmp_path, lines: list) -> str:
    path = tmp_path / f"task{len(list(tmp_path.glob('task*')))}.jsonl"
    path.write_text("".join((json.dumps(line) if not isinstance(line, str) else line) + "\n" for line in lines))
    return str(path)


@pytest.mark.parametrize("case, needle", [
    ("unknown", "'squad' is not a task"),
    ("missing", "line 2 has no 'answer'"),
    ("out_of_range", "answer 2 is not an index into its 2 choices"),
    # more cases of the classes above, through the entry point (each a run's start-up: 1-4 s)
    pytest.param("negative", "answer -1 is not an index", marks=pytest.mark.slow),
    ("empty", "holds no items"),
    pytest.param("no_file", "cannot read", marks=pytest.mark.slow),
    pytest.param("not_json", "line 1 is not a JSON object", marks=pytest.mark.slow),
    pytest.param("empty_choice", "choices is not a list of non-empty strings", marks=pytest.mark.slow),
    pytest.param("mixed", "mixes items of one choice", marks=pytest.mark.slow),
    pytest.param("adapter_columns", "is not in Rowan/hellaswag's columns", marks=pytest.mark.slow),
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


# --------------------------------------------------------------------------- bundled task, loop, evaluate.py

BUNDLED = "data/tasks/comedy_line_end.jsonl"


def margin(items: int) -> float:
    """Over n items of 4 choices a model that guesses scores 0.25 with a standard deviation of sqrt(0.25 x 0.75 / n)
    (0.031 for the 200 items of the default run, 0.043 for 100). "Near chance" is within 3 of them, "above chance"
    more than 3 above: 0.25 + 0.092 = 0.342 for 200 items (1 in 700 for a model that guesses)."""
    return 3 * math.sqrt(0.25 * 0.75 / items)


def test_a_fresh_default_model_scores_the_bundled_task_near_chance(tokenizer):
    from pretrain.models import build_model, model_config_for
    cfg = load_config(REPO / "configs/default.yaml")
    assert cfg.eval.tasks == [BUNDLED]
    torch.manual_seed(cfg.train.seed)
    model = build_model(model_config_for(cfg.model, tokenizer))
    task = load_task(str(REPO / BUNDLED), 100, cfg.data.seq_len, tokenizer)  # (the default run's 200: 2x the time)
    fresh_accelerate_state()
    row = evaluate_tasks(Accelerator(cpu=True), model, [task], seq_len=cfg.data.seq_len, micro_batch_size=8)
    assert row["eval/comedy_line_end/items"] == 100
    assert abs(row["eval/comedy_line_end/acc"] - 0.25) <= margin(100)
    assert abs(row["eval/comedy_line_end/acc_norm"] - 0.25) <= margin(100)


@pytest.mark.slow
@pytest.mark.timeout(3600)  # a few minutes on 2 idle cores; 40 on cores shared with other work
def test_the_default_run_scores_the_bundled_task_above_chance(tmp_path):
    """The default run (800 steps), with its default eval.tasks."""
    out = tmp_path / "default"
    result = run_in_process([f"--output_dir={out}", "--tracking.backends=[]", "--sample.max_new_tokens=0"])
    assert result.returncode == 0, result.stderr
    evals = [row for row in read_metrics(out) if "eval_loss" in row]
    first, last = evals[0], evals[-1]
    assert last["eval/comedy_line_end/items"] == 200
    assert last["eval/comedy_line_end/acc"] > 0.25 + margin(200)
    assert last["eval_bpb"] < first["eval_bpb"]
    assert "bits per byte" in result.stdout and "comedy_line_end accuracy" in result.stdout
    card = (out / "final" / "README.md").read_text()
    assert "| comedy_line_end | 200 |" in card


def evaluate_script(argv: list[str]) -> subprocess.CompletedProcess:
    """scripts/evaluate.py's main(ARGV) in this process."""
    spec = importlib.util.spec_from_file_location("evaluate_script", REPO / "scripts" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fresh_accelerate_state()
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = module.main(argv)
    return subprocess.CompletedProcess(argv, status, out.getvalue(), err.getvalue())


TASKS = [str(REPO / BUNDLED), f"lambada={FIXTURES / 'lambada.jsonl'}"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run of 2 steps that scores both tasks (30 items of the bundled one) at its last step."""
    out = tmp_path_factory.mktemp("tasks") / "run"
    result = run_in_process([*TINY_LLAMA, *QUIET, "--train.max_steps=2", f"--output_dir={out}",
                             "--tracking.backends=[tensorboard]", f"--eval.tasks={json.dumps(TASKS)}",
                             "--eval.task_items=30"])
    assert result.returncode == 0, result.stderr
    assert "bits per byte" in result.stdout and "comedy_line_end accuracy" in result.stdout
    return out


@pytest.mark.slow
def test_the_loop_logs_each_task_and_the_eval_time(trained):
    row = read_metrics(trained)[-1]
    assert row["eval/comedy_line_end/items"] == 30 and row["eval/lambada/items"] == 2
    columns = {"eval/comedy_line_end/acc", "eval/comedy_line_end/acc_norm", "eval/comedy_line_end/bpb",
               "eval/lambada/acc", "eval/lambada/bpb", "eval_bpb", "eval_seconds"}
    assert columns <= set(row) and "eval/lambada/acc_norm" not in row
    assert row["eval_seconds"] > 0 and row["eval_bpb"] > 0
    assert columns <= set(tensorboard_rows(trained)[2])  # the trackers get the row as metrics.jsonl has it
    card = (trained / "final" / "README.md").read_text()
    assert "| comedy_line_end | 30 |" in card and "| lambada | 2 |" in card and "bits per byte" in card
    fig = build_figure(read_runs([str(trained)]))
    gids = {line.get_gid() for ax in fig.axes for line in ax.get_lines()}
    assert {"eval_bpb", "eval/comedy_line_end/acc", "eval/comedy_line_end/acc_norm", "eval/lambada/acc"} <= gids


@pytest.mark.slow
@pytest.mark.parametrize("folder", ["final", "checkpoints/step_2"])
def test_evaluate_script_scores_a_checkpoint_or_final_as_the_loop_did(trained, folder):
    result = evaluate_script([str(trained / folder), "--tasks", *TASKS, "--task-items=30"])
    assert result.returncode == 0, result.stderr
    row, logged = json.loads(result.stdout), read_metrics(trained)[-1]
    scores = {key: value for key, value in logged.items() if key.startswith("eval/")}
    assert {key: row[key] for key in scores} == pytest.approx(scores, rel=1e-6)


@pytest.mark.slow
def test_evaluate_script_refuses_an_unknown_task(trained):
    result = evaluate_script([str(trained / "final"), "--tasks", "squad"])
    assert result.returncode == 2 and result.stderr.startswith("error: --tasks: 'squad' is not a task")


@pytest.mark.slow
def test_two_processes_score_as_one(trained):
    """P=2 (gloo): each process scores half of the items; the sums over processes equal P=1's."""
    args = [str(trained / "final"), "--tasks", *TASKS, "--task-items=30"]
    one = json.loads(evaluate_script(args).stdout)
    two = run_accelerate_launch(args, num_processes=2, script=REPO / "scripts" / "evaluate.py")
    assert two.returncode == 0, two.stderr
    [line] = [line for line in two.stdout.splitlines() if line.startswith("{")]  # printed by the main process only
    row = json.loads(line)
    del one["eval_seconds"], row["eval_seconds"]
    assert row == pytest.approx(one, rel=1e-9)
