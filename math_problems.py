"""GSM8K-format math problems as train.py splits them: what generate_dpo_pairs.py samples solutions to, and what
extension/best_of_n.py draws candidates for."""

from __future__ import annotations

from config import resolve
from custom_dataset import DataError, detect_format, load_raw, normalise
from metrics import gold_answer, parse


def load_problems(dataset_name: str, split: str, num_problems: int | None, seed: int, synthetic_levels: str) -> list[dict]:
    """The first ``num_problems`` problems (all with None) of a split of a GSM8K-format dataset (``question``, and an
    ``answer`` ending in '#### N').

    The dataset is read as train.py reads it (``custom_dataset.load_raw``), so the 'test' split is the problems an
    SFT or DPO run with the same ``seed`` held out: 'synthetic-math' (its first problems), a hub id
    ('openai/gsm8k:main'), a local file or a ``save_to_disk`` folder (a file has no test split: train.py carves one).

    Args:
        dataset_name: as train.py's --dataset-name.
        split: 'train' or 'test'.
        num_problems: how many problems; None for the whole split.
        seed: train.py's --seed (synthetic-math's problems, and the carving of a test split).
        synthetic_levels: synthetic-math's difficulty levels, comma separated.

    Returns:
        ``{question_id, question, reference, gold_answer}`` per problem, in order; ``question_id`` is the dataset's
        ``id`` column, else the row's index in the split.

    Raises:
        ConfigError: a bad dataset name, seed or levels.
        DataError: the data is not GSM8K-format, a final answer is unreadable, or an id repeats.
    """
    flags = ["--dataset-name", dataset_name, "--seed", str(seed), "--synthetic-levels", synthetic_levels]
    if split == "test" and num_problems is not None:  # synthetic-math makes as many held-out problems as asked
        flags += ["--test-dataset-length", str(num_problems)]
    cfg, _ = resolve(flags)
    rows = load_raw(cfg)[split]
    detect_format(rows.column_names, "gsm8k", dataset_name)
    if num_problems is not None:
        rows = rows.select(range(min(num_problems, len(rows))))
    ids = rows["id"] if "id" in rows.column_names else range(len(rows))
    problems: list[dict] = []
    seen: set[str] = set()
    for row, raw_id in zip(normalise(rows, "gsm8k", dataset_name, split), ids):
        where = f"{dataset_name} [{split}] row {row['row']}"
        gold, question_id = gold_answer(row["reference"]), str(raw_id)
        if not parse(gold):
            raise DataError(f"{where}: math-verify reads no answer in the final '#### {gold}'")
        if question_id in seen:  # ids are how a rerun knows which problems are done
            raise DataError(f"{where}: id {question_id!r} is used twice; problem ids must be unique")
        seen.add(question_id)
        problems.append({"question_id": question_id, "question": row["messages"][0]["content"],
                         "reference": row["reference"], "gold_answer": gold})
    return problems
