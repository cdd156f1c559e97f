"""Build GenRM-CoT verification data from the genrm-critiques release, or offline from synthetic_math.py (one-slip
solutions, or a policy's own samples drawn by generate_dpo_pairs.py).

The result is a ``DatasetDict`` with four splits:

- ``verify_train`` / ``verify_validation``: ``question_id``, ``question``, ``solution``, ``prompt`` (question,
  solution and "Verification: Let's verify step by step."), ``rationale`` (ending with the line
  "Verification: Is the answer correct (Yes/No)? Yes|No") and ``label`` ("Yes"/"No").
- ``correct_train`` / ``correct_validation``: ``question_id``, ``question``, ``solution`` of the correct
  solutions, deduplicated by (question_id, solution).

``--path`` is a clone of genrm-star/genrm-critiques' ``critiques`` folder, in either layout (or both):

- zipped jsonl batches ``critiques_{correct,incorrect}_solutions_batch_NN[_val].zip`` with rows
  ``{inputs, targets, question_id, model_output_id}``; ``_val`` batches are the validation split;
- ``data_collection/*.jsonl.gz`` with rows ``{question, question_id, model_output, correctness,
  verifier_output, target, ...}``; a seeded ``--val-fraction`` of its question ids is held out for validation.

The label is the verdict at the end of the rationale: "Verification: Is the answer correct (Yes/No)? Yes|No" or
"...correct? (Yes/No) Yes|No", markdown emphasis and whitespace between the parts tolerated, text after it dropped.
A verification row is skipped, with its file, row number and reason, when its rationale has no verdict or its
verdict disagrees with the row's known correctness (``correctness``, or the zip's correct/incorrect name).
The correct-solutions part does not depend on the rationale: it takes every row known to be correct.

    python extension/data_preparation.py --path genrm-critiques/critiques --output-dir /tmp/genrm-prep
    python extension/data_preparation.py --source synthetic --num-problems 2000 --output-dir /tmp/synth-prep
    python extension/data_preparation.py --source policy --path /tmp/sft-samples --output-dir /tmp/policy-prep
    HF_TOKEN=... python extension/data_preparation.py --path genrm-critiques/critiques --repo me/genrm-verify
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import time
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import stopping
import synthetic_math
from errors import ArgumentParser, fail
from secrets_guard import excerpt, redact_dataset, redact_output, refuse_secret_args, write_jsonl

VERIFY_PROMPT = "Verification: Let's verify step by step."
VERDICT = "Verification: Is the answer correct (Yes/No)?"
SPLITS = ("verify_train", "verify_validation", "correct_train", "correct_validation")
VERIFY_COLUMNS = ("question_id", "question", "solution", "prompt", "rationale", "label")
CORRECT_COLUMNS = ("question_id", "question", "solution")
ZIP_NAME = re.compile(r"critiques_(correct|incorrect)_solutions_batch_\d+(_val)?\.zip")
# The last verdict, in the forms the critic models write it: markdown/HTML emphasis and any whitespace (newlines
# too) between its parts ("**Verification:**\nIs", "**Verification**: Is", "?** No", "<b>No</b>"), and the
# question mark before or after "(Yes/No)" ("correct (Yes/No)? X", "correct? (Yes/No) X", "correct? (Yes/No)? X"), or
# no "(Yes/No)" at all ("correct? X").
# The verdict is a whole word (a trailing "_" is emphasis) not followed by "/" ("Yes/No" copied from the question
# is no verdict).
_MARKUP = r"(?:[*_\s]|</?(?:b|strong)>)*"  # one character per repeat: no nested quantifier to backtrack through
_VERDICT_RE = re.compile(r"Verification" + _MARKUP + ":" + _MARKUP + r"Is\s+the\s+answer\s+correct"
                         r"(?:\s*\(Yes/No\)\s*\?|\s*\?\s*\(Yes/No\)(?:\s*\?)?|\s*\?)" + _MARKUP + r"((?i:yes|no))(?![^\W_]|\s*/)")
_QUESTION_MARK = "\nQ: "
_ANSWER_MARK = "\nA: Let's think step by step.\n"
MAX_SKIPS_SHOWN = 20


class SkipRow(Exception):
    """A row that cannot be used: `reason` is counted in the summary, `detail` says what was found."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


@dataclass
class Report:
    """What was read and skipped, for the printed summary."""

    rows_read: dict[str, int] = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)  # {"file", "row", "reason", "detail"}

    def skip(self, file: str, row: int, error: SkipRow) -> None:
        self.skipped.append({"file": file, "row": row, "reason": error.reason, "detail": error.detail})


@dataclass
class Collected:
    """Rows of one source before the split; `val_ids` are the question ids fixed to validation by `_val` files,
    `carve_ids` those of files without a validation split (a --val-fraction of them is held out)."""

    verify: list[dict] = field(default_factory=list)
    correct: list[dict] = field(default_factory=list)
    val_ids: set[str] = field(default_factory=set)
    carve_ids: set[str] = field(default_factory=set)


# ---- rows ----------------------------------------------------------------------------------------------

def build_prompt(question: str, solution: str) -> str:
    """The verification prompt: `parse_inputs(build_prompt(q, s)) == (q, s)`."""
    return f"Q: {question}{_ANSWER_MARK}{solution}\n{VERIFY_PROMPT}"


def parse_inputs(inputs: str) -> tuple[str, str]:
    """(question, solution) from a zip row's `inputs`: header, then "Q: ...", "A: Let's think step by step.",
    the solution and "Verification: Let's verify step by step.".

    Raises:
        SkipRow: `inputs` is not in that layout.
    """
    text = "\n" + inputs.rstrip()  # the prompt may start with "Q: " (no header)
    start = text.rfind(_QUESTION_MARK)
    middle = text.find(_ANSWER_MARK, start)
    if start < 0 or middle < 0 or not text.endswith("\n" + VERIFY_PROMPT):
        raise SkipRow("inputs not in the Q:/A:/Verification layout", excerpt(inputs, 80, end=True))
    question = text[start + len(_QUESTION_MARK):middle]
    solution = text[middle + len(_ANSWER_MARK):-len(VERIFY_PROMPT) - 1]
    if not question.strip() or not solution.strip():
        raise SkipRow("empty question or solution")
    return question, solution


def parse_verdict(text: str) -> tuple[str, str]:
    """The rationale cut after its last verdict, with that line normalised, and the label.

    Returns:
        (rationale ending with "Verification: Is the answer correct (Yes/No)? Yes|No", "Yes" or "No").

    Raises:
        SkipRow: no verdict in `text`.
    """
    matches = list(_VERDICT_RE.finditer(text))
    if not matches:
        raise SkipRow("no verdict", repr(excerpt(text, 60, end=True)))
    match = matches[-1]
    label = match.group(1).capitalize()
    head = _strip_trailing_markup(text[:match.start()])  # the "**" or "<b>" that opened the verdict line
    return (f"{head}\n\n" if head else "") + f"{VERDICT} {label}", label


def _strip_trailing_markup(text: str) -> str:
    """`text` without the whitespace, "*", "_", <b> and <strong> tags at its end (a loop, not a regex anchored at
    the end, which would rescan every run of markup in `text`)."""
    while True:
        stripped = text.rstrip(" \t\r\n*_")
        for tag in ("<b>", "</b>", "<strong>", "</strong>"):
            stripped = stripped.removesuffix(tag)
        if stripped == text:
            return text
        text = stripped


def verify_row(question_id: str, question: str, solution: str, critique: str, expected: str, source: str) -> dict:
    """A verification row; `expected` is the label the row's `source` ("correctness", "file name") says.

    Raises:
        SkipRow: no verdict, or a verdict that disagrees with `expected`.
    """
    rationale, label = parse_verdict(critique)
    if label != expected:
        raise SkipRow(f"verdict disagrees with {source}", f"verdict {label}, {source} says {expected}")
    return {"question_id": question_id, "question": question, "solution": solution,
            "prompt": build_prompt(question, solution), "rationale": rationale, "label": label}


def _fields(row: object, names: tuple[str, ...]) -> dict:
    """`row`'s `names` as strings (question ids may be ints); raises SkipRow if one is missing or not text."""
    if not isinstance(row, dict):
        raise SkipRow("row is not a JSON object")
    missing = [n for n in names if n not in row or row[n] is None]
    if missing:
        raise SkipRow("missing field", ", ".join(missing))
    bad = [n for n in names if not isinstance(row[n], (str, int)) or isinstance(row[n], bool)]
    if bad:
        raise SkipRow("field is not text", ", ".join(bad))
    return {n: str(row[n]) for n in names}


def _jsonl(lines: Iterable[bytes], file: str, report: Report) -> Iterator[tuple[int, dict]]:
    """(1-based row number, parsed row) for each non-empty line; bad JSON is skipped and reported."""
    count = 0
    for number, line in enumerate(lines, start=1):
        stopping.check()  # nothing is written before every row is read
        if not line.strip():
            continue
        count += 1
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            report.skip(file, number, SkipRow("invalid JSON", str(exc)))
        except UnicodeDecodeError as exc:
            report.skip(file, number, SkipRow("not UTF-8 text", str(exc)))
    report.rows_read[file] = report.rows_read.get(file, 0) + count


# ---- the two layouts -----------------------------------------------------------------------------------

def read_zip_batch(path: Path, out: Collected, report: Report) -> None:
    """Adds one `critiques_{correct,incorrect}_solutions_batch_NN[_val].zip` to `out`."""
    name = ZIP_NAME.fullmatch(path.name)
    if name is None:
        raise ValueError(f"{path}: not a critiques_{{correct,incorrect}}_solutions_batch_NN[_val].zip batch name")
    is_correct, is_val = name.group(1) == "correct", name.group(2) is not None
    try:
        _read_zip(path, is_correct, is_val, out, report)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:  # not a zip, truncated, or a member that fails its CRC
        raise ValueError(f"{path}: not a readable zip archive ({exc}); download it again") from None


def _read_zip(path: Path, is_correct: bool, is_val: bool, out: Collected, report: Report) -> None:
    with zipfile.ZipFile(path) as archive:
        members = [m for m in archive.namelist() if m.endswith(".jsonl")]
        if not members:
            raise ValueError(f"{path}: no .jsonl file inside the zip")
        for member in members:
            file = f"{path.name}/{member}"
            with archive.open(member) as lines:
                for number, row in _jsonl(lines, file, report):
                    try:
                        values = _fields(row, ("inputs", "targets", "question_id"))
                        question, solution = parse_inputs(values["inputs"])
                        qid = values["question_id"]
                        (out.val_ids if is_val else out.carve_ids).add(qid)
                        if is_correct:
                            out.correct.append({"question_id": qid, "question": question, "solution": solution})
                        out.verify.append(verify_row(qid, question, solution, values["targets"],
                                                     "Yes" if is_correct else "No", "file name"))
                    except SkipRow as error:
                        report.skip(file, number, error)


def read_data_collection(path: Path, out: Collected, report: Report) -> None:
    """Adds one `data_collection/*.jsonl.gz` (or `.jsonl`) file to `out`."""
    try:
        _read_collection(path, out, report)
    except (gzip.BadGzipFile, zlib.error, EOFError) as exc:  # not gzip, or truncated
        raise ValueError(f"{path}: not a readable gzip file ({exc}); download it again") from None


def _read_collection(path: Path, out: Collected, report: Report) -> None:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as lines:
        for number, row in _jsonl(lines, path.name, report):
            try:
                values = _fields(row, ("question", "question_id", "model_output", "correctness", "verifier_output"))
                if values["correctness"] not in ("0", "1"):
                    raise SkipRow("correctness is not 0 or 1", values["correctness"])
                qid, question, solution = values["question_id"], values["question"], values["model_output"]
                out.carve_ids.add(qid)
                if values["correctness"] == "1":
                    out.correct.append({"question_id": qid, "question": question, "solution": solution})
                out.verify.append(verify_row(qid, question, solution, values["verifier_output"],
                                             "Yes" if values["correctness"] == "1" else "No", "correctness"))
            except SkipRow as error:
                report.skip(path.name, number, error)


def find_files(path: Path) -> list[Path]:
    """The zip batches and data_collection files under `path`, auto-detecting the layout(s)."""
    if not path.is_dir():
        raise ValueError(f"--path {path} is not a folder")
    files = sorted(path.glob("critiques_*.zip"))
    collection = path / "data_collection"
    if path.name == "data_collection":  # --path pointed at the folder itself
        collection = path
    files += sorted(collection.glob("*.jsonl.gz")) + sorted(collection.glob("*.jsonl"))
    if not files:
        raise ValueError(f"--path {path} has neither critiques_*_solutions_batch_*.zip batches "
                         "nor a data_collection folder of .jsonl.gz files")
    return files


def read_genrm(path: Path, report: Report) -> Collected:
    """All rows of both layouts under `path`, with a progress bar over the files."""
    from tqdm import tqdm

    out = Collected()
    for file in tqdm(find_files(path), desc="files", unit="file"):
        if file.suffix == ".zip":
            read_zip_batch(file, out, report)
        else:
            read_data_collection(file, out, report)
    return out


def read_synthetic(num_problems: int, seed: int, levels: tuple[int, ...] = (1, 2, 3), held_out: int = 0) -> Collected:
    """Verification rows from `synthetic_math`: within each level every other problem gets a wrong solution (one
    slip, see `synthetic_math.verification_candidates`), and its rationale checks the solution step by step against
    the known computation.

    The first `held_out` problems are fixed to validation (the held-out problems of `synthetic_math.build_dataset`
    with the same seed and levels, so SFT, DPO and the verifier never train on them); the others are carved."""
    out = Collected()
    for index, (problem, steps) in enumerate(synthetic_math.verification_candidates(num_problems, seed, levels)):
        stopping.check()
        solution = synthetic_math.solution_text(steps, steps[-1].result)
        rationale, is_correct = synthetic_math.verification_rationale(problem, steps)
        out.verify.append(verify_row(problem.id, problem.question, solution, rationale,
                                     "Yes" if is_correct else "No", "synthetic_math"))
        out.correct.append({"question_id": problem.id, "question": problem.question,
                            "solution": synthetic_math.correct_solution(problem)})
        (out.val_ids if index < held_out else out.carve_ids).add(problem.id)
    return out


def read_policy_samples(folder: Path, report: Report) -> Collected:
    """Verification rows from a policy's own samples: a `generate_dpo_pairs.py --dataset-name synthetic-math` folder
    (`generation.json`, `samples.jsonl`). Each sample's steps are parsed (`synthetic_math.parse_solution`) and
    checked against the problem's known computation, which writes its rationale; its label is the sample's
    math-verify correctness, and a sample whose rationale disagrees with it (its steps right but its "####" line
    wrong, say) is skipped, as is one not in the solution format. The correct part is each problem's reference
    solution. The policy's mistakes are what a verifier must catch at Best-of-N time, and the one-slip
    solutions of `read_synthetic` are not the same distribution.

    Raises:
        ValueError: the folder is not a synthetic-math run of generate_dpo_pairs.py.
    """
    settings_file, samples_file = folder / "generation.json", folder / "samples.jsonl"
    if not settings_file.is_file() or not samples_file.is_file():
        raise ValueError(f"--path {folder}: no generation.json and samples.jsonl; --source policy reads a folder "
                         "written by generate_dpo_pairs.py --dataset-name synthetic-math")
    try:
        settings = json.loads(settings_file.read_bytes())
        if not isinstance(settings, dict):
            raise ValueError(f"a JSON {type(settings).__name__}, not an object")
    except ValueError as exc:  # not UTF-8, not JSON
        raise ValueError(f"{settings_file}: not generate_dpo_pairs.py's settings file ({exc})") from None
    if settings.get("dataset_name") != synthetic_math.DATASET_NAME:
        raise ValueError(f"{settings_file}: samples of --dataset-name {settings.get('dataset_name')}; --source policy "
                         f"needs {synthetic_math.DATASET_NAME}, whose computations are known")
    levels = tuple(int(x) for x in str(settings["synthetic_levels"]).split(","))
    with samples_file.open("rb") as lines:
        records = list(_jsonl(lines, samples_file.name, report))
    for number, record in records:
        missing = [k for k in ("question_id", "question", "samples", "correct")
                   if not isinstance(record, dict) or k not in record]
        if missing:
            raise ValueError(f"{samples_file} row {number}: not a generate_dpo_pairs.py record (no {', '.join(missing)})")
    try:
        problems = synthetic_math.problems_by_id([str(r["question_id"]) for _, r in records], levels)
    except ValueError as exc:
        raise ValueError(f"{samples_file}: {exc}") from None
    out = Collected()
    for number, record in records:
        problem = problems[str(record["question_id"])]
        if record.get("question") != problem.question:
            raise ValueError(f"{samples_file} row {number}: the question of {problem.id} is not synthetic-math's "
                             f"with seed and levels {settings['seed']}, {settings['synthetic_levels']}")
        out.carve_ids.add(problem.id)
        out.correct.append({"question_id": problem.id, "question": problem.question,
                            "solution": synthetic_math.correct_solution(problem)})
        for sample, correct in zip(record["samples"], record["correct"], strict=True):
            label = "Yes" if correct else "No"
            try:
                parsed = synthetic_math.parse_solution(sample)
                if parsed is None:
                    raise SkipRow("sample not in the solution format", repr(excerpt(sample, 60, end=True)))
                rationale, _ = synthetic_math.verification_rationale(problem, parsed[0])
                out.verify.append(verify_row(problem.id, problem.question, sample, rationale, label, "math-verify"))
            except SkipRow as error:
                report.skip(samples_file.name, number, error)
    return out


# ---- splits and output ---------------------------------------------------------------------------------

def validation_ids(collected: Collected, val_fraction: float, seed: int) -> set[str]:
    """Question ids of the validation split: those of `_val` batches, plus a seeded `val_fraction` of the ids
    seen only in files without a validation split (so no question is in both splits, across layouts too)."""
    pool = sorted(collected.carve_ids - collected.val_ids)
    random.Random(seed).shuffle(pool)
    n_val = round(val_fraction * len(pool)) if len(pool) > 1 else 0
    return collected.val_ids | set(pool[:n_val])


def build_splits(collected: Collected, val_fraction: float, seed: int) -> dict[str, list[dict]]:
    """The four splits; a row is in validation iff its question id is; correct rows deduplicated."""
    val_ids = validation_ids(collected, val_fraction, seed)
    splits: dict[str, list[dict]] = {name: [] for name in SPLITS}
    for row in collected.verify:
        splits["verify_validation" if row["question_id"] in val_ids else "verify_train"].append(row)
    seen: set[tuple[str, str]] = set()
    for row in collected.correct:
        key = (row["question_id"], row["solution"])
        if key not in seen:
            seen.add(key)
            splits["correct_validation" if row["question_id"] in val_ids else "correct_train"].append(row)
    return splits


def to_dataset_dict(splits: dict[str, list[dict]]):
    """`splits` as a `datasets.DatasetDict` of string columns (empty splits keep their columns)."""
    import datasets

    out = {}
    for name, rows in splits.items():
        columns = VERIFY_COLUMNS if name.startswith("verify") else CORRECT_COLUMNS
        features = datasets.Features({c: datasets.Value("string") for c in columns})
        out[name] = datasets.Dataset.from_dict({c: [r[c] for r in rows] for c in columns}, features=features)
    return datasets.DatasetDict(out)


def summarize(report: Report, splits: dict[str, list[dict]]) -> dict:
    """Rows read per file, kept per label per split, skipped per reason."""
    kept = {name: dict(sorted(Counter(r["label"] for r in rows).items())) if name.startswith("verify")
            else {"rows": len(rows)} for name, rows in splits.items()}
    return {"rows_read": dict(report.rows_read), "kept": kept,
            "skipped": dict(Counter(s["reason"] for s in report.skipped).most_common()),
            "skipped_rows": report.skipped}


def print_summary(summary: dict, skipped_file: Path | None) -> None:
    print("rows read:")
    for file, count in summary["rows_read"].items():
        print(f"  {file}: {count}")
    print("kept:")
    for name, counts in summary["kept"].items():
        print(f"  {name}: " + ", ".join(f"{k} {v}" for k, v in counts.items()) if counts else f"  {name}: 0")
    skipped = summary["skipped_rows"]
    print(f"skipped: {len(skipped)}")
    for reason, count in summary["skipped"].items():
        print(f"  {reason}: {count}")
    shown = skipped if skipped_file is None else skipped[:MAX_SKIPS_SHOWN]
    for s in shown:
        print(f"  {s['file']} row {s['row']}: {s['reason']}" + (f" ({s['detail']})" if s["detail"] else ""))
    if len(shown) < len(skipped):
        print(f"  ... all {len(skipped)} skipped rows are listed in {skipped_file}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(prog="data_preparation.py", description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=("genrm", "synthetic", "policy"), default="genrm",
                        help="genrm: the genrm-critiques files under --path; synthetic: synthetic_math.py, offline; "
                             "policy: a policy's own samples of synthetic-math problems, from generate_dpo_pairs.py.")
    parser.add_argument("--path", help="--source genrm: a genrm-critiques `critiques` folder (zip batches, "
                                       "data_collection/, or both); --source policy: a generate_dpo_pairs.py folder.")
    parser.add_argument("--output-dir", help="Save the DatasetDict here (save_to_disk), with skipped.jsonl.")
    parser.add_argument("--repo", help="Push the DatasetDict to this private hub dataset repo (needs HF_TOKEN).")
    parser.add_argument("--num-problems", type=int, default=2000, help="Synthetic problems (half get a wrong solution).")
    parser.add_argument("--val-fraction", type=float, default=0.05,
                        help="Fraction of question ids held out for validation where there are no _val batches.")
    parser.add_argument("--seed", type=int, default=0, help="Seeds the validation carve and the synthetic problems.")
    args = parser.parse_args(argv)
    refuse_secret_args(parser, args)
    if args.source == "genrm" and args.path is None:
        parser.error("--source genrm needs --path, a clone of genrm-critiques' critiques folder")
    if args.source == "policy" and args.path is None:
        parser.error("--source policy needs --path, a folder written by generate_dpo_pairs.py")
    if args.output_dir is None and args.repo is None:
        parser.error("give --output-dir, --repo or both")
    if not 0 <= args.val_fraction < 1:
        parser.error(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.num_problems < 1:
        parser.error(f"--num-problems must be positive, got {args.num_problems}")
    if args.repo is not None and not os.environ.get("HF_TOKEN"):
        parser.error(f"--repo {args.repo} needs a Hugging Face write token in the HF_TOKEN environment variable")
    return args


@stopping.stop_on_signals("data_preparation.py")
def main(argv: list[str] | None = None) -> dict:
    """Run the script; returns the summary it prints (for tests)."""
    redact_output()  # everything printed or logged from here on passes through secrets_guard.redact
    args = parse_args(argv)
    started = time.time()
    report = Report()
    try:
        if args.source == "synthetic":
            collected = read_synthetic(args.num_problems, args.seed)
        elif args.source == "policy":
            collected = read_policy_samples(Path(args.path), report)
        else:
            collected = read_genrm(Path(args.path), report)
        if not collected.verify and not collected.correct:
            read = sum(report.rows_read.values())
            raise ValueError(f"--path {args.path}: no usable row ({read} read, {len(report.skipped)} skipped"
                             + (f", e.g. {report.skipped[0]['file']} row {report.skipped[0]['row']}: "
                                f"{report.skipped[0]['reason']}" if report.skipped else "") + ")")
    except (ValueError, OSError) as exc:  # bad input (files named in the message): one line, exit status 2
        fail("data_preparation.py", exc)
    stopping.check()  # a stop before the output is written leaves none; once writing, it is finished
    splits = build_splits(collected, args.val_fraction, args.seed)
    dataset = redact_dataset(to_dataset_dict(splits))  # saved and pushed as it is
    summary = summarize(report, splits)
    skipped_file = None
    if args.output_dir:
        # datasets writes an empty split (e.g. --val-fraction 0) as zero shards, which load_from_disk cannot read
        # back (IndexError in concat_tables): one shard each keeps the folder loadable.
        dataset.save_to_disk(args.output_dir, num_shards={name: 1 for name, split in dataset.items() if len(split) == 0})
        skipped_file = Path(args.output_dir) / "skipped.jsonl"
        write_jsonl(skipped_file, report.skipped)
    print_summary(summary, skipped_file)
    if args.output_dir:
        print(f"saved to {args.output_dir}")
    if args.repo:
        dataset.push_to_hub(args.repo, private=True, token=os.environ["HF_TOKEN"])
        print(f"pushed to the private hub dataset {args.repo}")
    summary["seconds"] = round(time.time() - started, 1)
    print(f"done in {summary['seconds']} s")
    return summary


if __name__ == "__main__":
    main()
