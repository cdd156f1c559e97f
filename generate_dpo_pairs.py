"""Build DPO pairs from the model's own samples: a correct solution (chosen) against an incorrect one (rejected).

For each GSM8K-format problem (``question``, and an ``answer`` ending in '#### N'), K solutions are sampled from
the model; math-verify checks each one's final answer against N. The first correct sample and the first
incorrect one make a pair; problems with no correct or no incorrect sample are skipped and counted.
The result is a preference dataset (``prompt``, ``chosen``, ``rejected`` plus the answers) that train.py reads:

    python generate_dpo_pairs.py --model-name smollm2-135m-instruct --dataset-name synthetic-math \
        --synthetic-levels 1,2 --num-problems 16 --samples-per-problem 4 --max-new-tokens 128 --output-dir /tmp/pairs
    python train.py --training-type dpo --model-name smollm2-135m-instruct --dataset-name /tmp/pairs

Pairs from your own GSM8K-format file, pushed to a private hub dataset (needs HF_TOKEN in the environment):

    python generate_dpo_pairs.py --dataset-name problems.jsonl --num-problems 1000 --output-dir pairs \
        --repo me/gsm8k-self-pairs

Resumable: every processed problem is appended to ``<output-dir>/samples.jsonl`` as it is done; rerunning the
same command skips those problems (a larger --num-problems extends the set), and the dataset is always built
from that file. Sampling uses transformers' ``generate``; a vLLM backend will slot in behind
``sample_solutions``.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections import Counter
from pathlib import Path

import torch

import stopping
from collate_functions import generation_prompt_ids
from config import ConfigError, TrainConfig
from custom_dataset import DataError
from errors import ArgumentParser, fail
from math_problems import load_problems
from metrics import check, parse
from models import cache_dir, load_causal_lm, load_tokenizer, model_folder_problem, token_bar
from resumable import append_rows, read_rows, save_or_check_settings
from sampling import generate_from_prompts
from secrets_guard import redact_dataset, redact_output, refuse_secret_args

SAMPLES_FILE = "samples.jsonl"
SETTINGS_FILE = "generation.json"
# Flags that change what is sampled: a rerun into the same folder must repeat them, or the samples would mix.
SAMPLING_FLAGS = ("model_name", "dataset_name", "split", "samples_per_problem", "temperature", "top_p",
                  "max_new_tokens", "seed", "synthetic_levels")
SKIP_REASONS = ("no correct sample", "no incorrect sample")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="generate_dpo_pairs.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model-name", default="smollm2-135m-instruct",
                        help="Model that samples the solutions: hub id, local folder, or 'smollm2-135m-instruct'.")
    parser.add_argument("--dataset-name", default="synthetic-math",
                        help="GSM8K-format problems (question, answer ending in '#### N'): hub id, local file or folder, "
                             "or 'synthetic-math'. A dataset without a test split is split as train.py splits it.")
    parser.add_argument("--split", default="train", choices=("train", "test"), help="Split whose problems are used.")
    parser.add_argument("--num-problems", type=int, default=None, help="Use only the first N problems of the split (None: all of them).")
    parser.add_argument("--samples-per-problem", type=int, default=4, help="Solutions sampled per problem (K).")
    parser.add_argument("--temperature", type=float, default=0.8, help="Sampling temperature.")
    parser.add_argument("--top-p", type=float, default=0.95, help="Nucleus sampling threshold (no top-k cut-off).")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="Token budget of each sampled solution.")
    parser.add_argument("--batch-size", type=int, default=8, help="Problems per generate call (each gives K sequences).")
    parser.add_argument("--seed", type=int, default=TrainConfig.seed, help="Seeds the dataset, the sampling and the test split.")
    parser.add_argument("--synthetic-levels", default=TrainConfig.synthetic_levels,
                        help="Difficulty levels of synthetic-math, comma separated (1-4).")
    parser.add_argument("--output-dir", default=None,
                        help="Folder for samples.jsonl and the dataset (save_to_disk); required unless --repo.")
    parser.add_argument("--repo", default=None,
                        help="Push the dataset to this private hub dataset repo (needs HF_TOKEN in the environment).")
    parser.add_argument("--test-size", type=float, default=0.05, help="Fraction of the pairs put in the test split.")
    parser.add_argument("--fallback-to-reference", action="store_true",
                        help="When no sample is correct, use the dataset's reference solution as the chosen answer.")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The flags, checked; any problem stops with a message naming the flag."""
    parser = build_parser()
    args = parser.parse_args(argv)
    refuse_secret_args(parser, args)
    for flag, value, ok, allowed in (
        ("--num-problems", args.num_problems, args.num_problems is None or args.num_problems >= 1, "at least 1"),
        ("--samples-per-problem", args.samples_per_problem, args.samples_per_problem >= 1, "at least 1"),
        ("--temperature", args.temperature, args.temperature > 0, "positive"),
        ("--top-p", args.top_p, 0 < args.top_p <= 1, "in (0, 1]"),
        ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, "at least 1"),
        ("--batch-size", args.batch_size, args.batch_size >= 1, "at least 1"),
        ("--test-size", args.test_size, 0 < args.test_size < 1, "in (0, 1)"),
    ):
        if not ok:
            parser.error(f"{flag} must be {allowed}, got {value}")
    if args.samples_per_problem == 1 and not args.fallback_to_reference:
        parser.error("--samples-per-problem 1 can never give both a correct and an incorrect sample: "
                     "use 2 or more, or add --fallback-to-reference")
    if args.output_dir is None and args.repo is None:
        parser.error("give --output-dir (a local folder), --repo (a hub dataset), or both")
    if args.repo is not None and not os.environ.get("HF_TOKEN"):
        parser.error(f"--repo {args.repo} needs a Hugging Face write token in the HF_TOKEN environment variable")
    if problem := model_folder_problem(args.model_name):  # before a run folder records it
        parser.error(problem)
    return args


# ---- sampling --------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_solutions(model, tokenizer, questions: list[str], k: int, *, temperature: float, top_p: float,
                     max_new_tokens: int, seed: int, progress=None) -> list[list[str]]:
    """``k`` sampled answers to each question, as the model answers a user turn in its chat template.

    Deterministic for the same questions, settings and ``seed`` (it reseeds torch's global generator).
    Note: ``generate`` repeats each prompt ``k`` times before the forward pass, so the prompt is computed k times.

    Returns:
        One list of ``k`` stripped answers per question, in order.
    """
    # generation_prompt_ids renders a conversation up to its final assistant answer, here a placeholder.
    prompts = [generation_prompt_ids(tokenizer, [{"role": "user", "content": q}, {"role": "assistant", "content": ""}])
               for q in questions]
    torch.manual_seed(seed)
    texts = generate_from_prompts(  # top_k=0: only the flags shape sampling, not HF's default of 50
        model, tokenizer, prompts, max_new_tokens, progress=progress, num_return_sequences=k, do_sample=True,
        temperature=temperature, top_p=top_p, top_k=0,
    )  # the k samples of each prompt adjacent
    return [texts[i * k:(i + 1) * k] for i in range(len(questions))]


# ---- the resumable samples file ----------------------------------------------------------------------------

def check_folder(folder: Path, settings: dict) -> None:
    """Create ``folder`` for a new run, or check that it holds an earlier run with the same sampling settings."""
    path = folder / SETTINGS_FILE
    if not path.is_file() and folder.is_dir() and any(folder.iterdir()):
        raise ConfigError([f"--output-dir {folder} is not empty and was not made by generate_dpo_pairs.py; "
                           "choose a new or empty folder"])
    folder.mkdir(parents=True, exist_ok=True)
    save_or_check_settings(path, settings, "--output-dir", folder)


def read_records(path: Path) -> dict[str, dict]:
    """The problems already processed, by question id (first record wins); see ``resumable.read_rows``."""
    records: dict[str, dict] = {}
    for record in read_rows(path, keys=("question_id",)):
        records.setdefault(record["question_id"], record)
    return records


def sample_problems(args: argparse.Namespace, problems: list[dict], path: Path, done: dict[str, dict]) -> None:
    """Sample, check and append to ``path`` every problem not in ``done``, one batch at a time."""
    todo = [p for p in problems if p["question_id"] not in done]
    if not todo:
        return
    model, tokenizer = load_causal_lm(args.model_name), load_tokenizer(args.model_name)
    if torch.cuda.is_available():
        model = model.to("cuda")
    finished = len(problems) - len(todo)
    stopping.keep(lambda: f"the samples of {finished} problems in {path} (rerun the same command to resume)")
    with token_bar("sampling solutions") as bar:
        # Batches are cut from the full problem list, so a resumed run seeds each batch as an uninterrupted one does.
        for start in range(0, len(problems), args.batch_size):
            batch = [p for p in problems[start:start + args.batch_size] if p["question_id"] not in done]
            if not batch:
                continue
            samples = sample_solutions(
                model, tokenizer, [p["question"] for p in batch], args.samples_per_problem, temperature=args.temperature,
                top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed + start // args.batch_size,
                progress=bar,
            )
            records = []
            for problem, texts in zip(batch, samples):
                gold = parse(problem["gold_answer"])
                answers, correct = zip(*(check(t, gold) for t in texts))
                records.append({**problem, "samples": texts, "answers": answers, "correct": correct})
            append_rows(path, records)
            finished += len(batch)
            bar.set_postfix_str(f"{finished}/{len(problems)} problems")


# ---- pairs and the dataset ---------------------------------------------------------------------------------

def make_pair(record: dict, fallback_to_reference: bool) -> tuple[dict | None, str | None]:
    """The pair of one processed problem, or None and the reason it is skipped.

    Chosen: the first correct sample (or, with ``fallback_to_reference``, the reference solution when none is).
    Rejected: the first incorrect sample that is not empty (the preference format refuses empty answers).
    """
    samples, answers, correct = record["samples"], record["answers"], record["correct"]
    good = next((i for i, ok in enumerate(correct) if ok), None)
    bad = next((i for i, ok in enumerate(correct) if not ok and samples[i].strip()), None)
    if bad is None:
        return None, "no incorrect sample"
    if good is not None:
        chosen, chosen_answer = samples[good], answers[good]
    elif fallback_to_reference:
        chosen, chosen_answer = record["reference"], record["gold_answer"]
    else:
        return None, "no correct sample"
    return {"prompt": record["question"], "chosen": chosen, "rejected": samples[bad],
            "question_id": record["question_id"], "chosen_answer": chosen_answer, "rejected_answer": answers[bad],
            "gold_answer": record["gold_answer"]}, None


def make_pairs(records: list[dict], fallback_to_reference: bool) -> tuple[list[dict], Counter]:
    """The pairs of all processed problems, in order, and how many problems were skipped for each reason."""
    pairs, skipped = [], Counter()
    for record in records:
        pair, reason = make_pair(record, fallback_to_reference)
        if pair is None:
            skipped[reason] += 1
        else:
            pairs.append(pair)
    return pairs, skipped


def build_dataset(pairs: list[dict], test_size: float, seed: int):
    """A DatasetDict {train, test} of the pairs, the test split a seeded random ``test_size`` fraction."""
    import datasets

    if len(pairs) < 2:
        raise DataError(f"only {len(pairs)} pair(s): too few for a train and a test split; sample more problems "
                        "(--num-problems), more solutions per problem (--samples-per-problem), or add --fallback-to-reference")
    split = datasets.Dataset.from_list(pairs).train_test_split(test_size=test_size, seed=seed)
    return datasets.DatasetDict({"train": split["train"], "test": split["test"]})


@stopping.stop_on_signals("generate_dpo_pairs.py")
def main(argv: list[str] | None = None) -> dict:
    """Run the script; returns the summary it prints (for tests)."""
    redact_output()  # everything printed or logged from here on passes through secrets_guard.redact
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    started = time.time()
    # With --repo alone, samples still go to a folder on disk, so that a push can be resumed too.
    folder = Path(args.output_dir) if args.output_dir else cache_dir() / "dpo-pairs" / args.repo.replace("/", "--")
    try:
        problems = load_problems(args.dataset_name, args.split, args.num_problems, args.seed, args.synthetic_levels)
        check_folder(folder, {k: getattr(args, k) for k in SAMPLING_FLAGS})
        path = folder / SAMPLES_FILE
        done = read_records(path)
        print(f"{len(problems)} problems, {sum(p['question_id'] in done for p in problems)} already in {path}")
        sample_problems(args, problems, path, done)
        records = read_records(path)
        records = [records[p["question_id"]] for p in problems]
        pairs, skipped = make_pairs(records, args.fallback_to_reference)
        n_samples = sum(len(r["correct"]) for r in records)
        n_correct = sum(sum(r["correct"]) for r in records)
        summary = {"problems": len(records), "pairs": len(pairs), "skipped": {r: skipped[r] for r in SKIP_REASONS},
                   "samples": n_samples, "sampled_accuracy": round(n_correct / max(n_samples, 1), 4)}
        print(f"problems: {summary['problems']}, pairs: {summary['pairs']}, skipped: "
              + ", ".join(f"{n} {reason}" for reason, n in summary["skipped"].items()))
        print(f"samples: {n_samples}, correct: {n_correct} (sampled accuracy {summary['sampled_accuracy']:.1%})")
        dataset = redact_dataset(build_dataset(pairs, args.test_size, args.seed))  # saved and pushed as it is
        print(f"dataset: {len(dataset['train'])} train / {len(dataset['test'])} test pairs")
        if args.output_dir:
            dataset.save_to_disk(args.output_dir)
            print(f"saved to {args.output_dir} (python train.py --training-type dpo --dataset-name {args.output_dir})")
        if args.repo:
            dataset.push_to_hub(args.repo, private=True, token=os.environ["HF_TOKEN"])
            print(f"pushed to the private hub dataset {args.repo}")
        summary["minutes"] = round((time.time() - started) / 60, 2)
        print(f"done in {summary['minutes']} min")
        return summary
    except (ConfigError, DataError, OSError) as exc:  # bad input: one line, exit status 2
        fail("generate_dpo_pairs.py", exc)


if __name__ == "__main__":
    main()
