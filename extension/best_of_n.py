"""Best-of-N with a GenRM-CoT verifier, against first-sample, majority-vote and oracle baselines.

For each problem, N candidate solutions: sampled from --generator (problems from synthetic-math or a GSM8K-format
dataset, correctness checked with math-verify), or read with their labels from genrm-critiques' data_collection
files (--candidates: all of a question's candidates are pooled across the files, then a seeded sample of --n is
drawn, so the mix of correct and incorrect ones does not depend on the files' order; --mixed-only keeps the
questions that have both). The verifier scores every candidate with r_MajV@K (adaptive K); Best-of-N picks the
highest-scoring of N. Reported for N = 1, 2, 4, ..., --n (each averaged over the --n / N disjoint groups of N
candidates of a problem):

- first sample: the first candidate of the group (one sample's accuracy, whatever N, up to which samples);
- majority vote (self-consistency): the most frequent final answer among the N (ties: the earliest);
- verifier: the highest verifier score among the N (ties: the earliest);
- oracle: any of the N is correct.

Also the verifier's AUC over all labeled candidates (raw p("Yes"), the score used to pick, and the normalized
Yes / (Yes + No)). With --compare-fixed-k every candidate gets K_max rationales: adaptive K is replayed on the
same samples (``extension.verifier.adaptive_k``), giving its mean rationales and how often its decision (score >= 0.5)
and its pick agree with fixed K = K_max.

Every stage is saved as it goes under --output-dir (candidates.jsonl, scores.jsonl) and skipped on a rerun, so an
interrupted evaluation resumes. Results: results.json, table.md and best_of_n.png.

    python extension/best_of_n.py --verifier runs/genrm-smollm2-math/final_model \\
        --generator runs/dpo-smollm2-math/final_model --dataset synthetic-math --synthetic-levels 1,2 \\
        --num-problems 16 --n 8 --output-dir runs/best-of-n
    python extension/best_of_n.py --verifier my-verifier --candidates genrm-critiques/critiques/data_collection \\
        --num-problems 50 --n 8 --output-dir runs/best-of-n-gsm8k
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import stopping
from config import VERIFIER_K_MAX, VERIFIER_K_MIN, VERIFIER_TAU, VERIFIER_TEMPERATURE, ConfigError
from custom_dataset import DataError
from errors import ArgumentParser, fail
from extension.verifier import adaptive_k
from math_problems import load_problems
from metrics import auc
from resumable import append_rows, read_rows, save_or_check_settings
from secrets_guard import redact_output, refuse_secret_args, write_json, write_text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(prog="best_of_n.py", description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verifier", required=True, help="The verifier: a model folder, hub id or alias.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--generator", help="Sample the candidates from this model.")
    source.add_argument("--candidates", help="Labeled candidates: a data_collection folder or .jsonl(.gz) file with "
                                             "question_id, question, model_output, correctness rows.")
    parser.add_argument("--mixed-only", action="store_true",
                        help="With --candidates: keep only questions that have both correct and incorrect candidates.")
    parser.add_argument("--dataset", default="synthetic-math",
                        help="Problems for --generator: the test split, as train.py splits it, of synthetic-math, a GSM8K-format "
                             "file or folder, or a hub id ('openai/gsm8k:main').")
    parser.add_argument("--synthetic-levels", default="1,2,3", help="synthetic-math levels (as for train.py).")
    parser.add_argument("--num-problems", type=int, default=30, help="Problems evaluated (the first ones).")
    parser.add_argument("--n", type=int, default=8, help="Candidates per problem: the largest N, a power of 2.")
    parser.add_argument("--gen-temperature", type=float, default=0.8, help="Sampling temperature of the candidates.")
    parser.add_argument("--gen-max-new-tokens", type=int, default=128, help="Token budget of a candidate.")
    parser.add_argument("--gen-batch-size", type=int, default=4, help="Problems per generation batch.")
    parser.add_argument("--k-min", type=int, default=VERIFIER_K_MIN, help="Adaptive K: group size and fewest rationales.")
    parser.add_argument("--k-max", type=int, default=VERIFIER_K_MAX, help="Adaptive K: most rationales.")
    parser.add_argument("--tau", type=float, default=VERIFIER_TAU,
                        help="Adaptive K: stop when the variance of p('Yes') is below.")
    parser.add_argument("--compare-fixed-k", action="store_true",
                        help="Sample K_max rationales per candidate and replay adaptive K on them: agreement with fixed K.")
    parser.add_argument("--verifier-temperature", type=float, default=VERIFIER_TEMPERATURE,
                        help="Sampling temperature of rationales.")
    parser.add_argument("--verifier-max-new-tokens", type=int, default=192, help="Token budget of a rationale.")
    parser.add_argument("--prompts-per-batch", type=int, default=8, help="Candidates verified together.")
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                        help="On a GPU: decode the rationales over a static KV cache, each token's forward pass replayed "
                             "as one CUDA graph (the same rationales and scores; no effect on the CPU).")
    parser.add_argument("--seed", type=int, default=42,
                        help="Seeds the problems (synthetic-math; 42 is the SFT/DPO runs' seed, whose held-out problems "
                             "these are), the --candidates sample and all sampling.")
    parser.add_argument("--output-dir", required=True, help="Where results and the resumable intermediate files go.")
    args = parser.parse_args(argv)
    refuse_secret_args(parser, args)
    if args.n < 1 or args.n & (args.n - 1):
        parser.error(f"--n must be a power of 2 (1, 2, 4, 8, ...), got {args.n}")
    if args.num_problems < 1:
        parser.error(f"--num-problems must be positive, got {args.num_problems}")
    if not 1 <= args.k_min <= args.k_max:
        parser.error(f"need 1 <= --k-min <= --k-max, got {args.k_min} and {args.k_max}")
    if args.mixed_only and not args.candidates:
        parser.error("--mixed-only selects among labeled --candidates; it does nothing with --generator")
    from models import model_folder_problem

    for flag, name in (("--verifier", args.verifier), ("--generator", args.generator)):
        if name and (problem := model_folder_problem(name, flag)):  # before settings.json records it
            parser.error(problem)
    return args


# ---- candidates ------------------------------------------------------------------------------------------

def final_answer(solution: str, reference: str) -> tuple[str, bool]:
    """The final answer math-verify reads in ``solution`` and whether it equals the reference's."""

    from metrics import check, gold_answer, parse

    return check(solution, parse(gold_answer(reference)))


def generate_candidates(args: argparse.Namespace, problems: list[dict], path: Path) -> None:
    """Append {question_id, question, candidates: [{solution, answer, correct}]} for each of ``problems``
    (``math_problems.load_problems``) to ``path``, skipping problems already there."""
    from collate_functions import generation_prompt_ids
    from models import load_causal_lm, load_tokenizer, token_bar
    from sampling import generate_from_prompts

    done = {row["question_id"] for row in read_rows(path, keys=("question_id",))}
    todo = [p for p in problems if p["question_id"] not in done]
    if not todo:
        return
    import torch

    torch.manual_seed(args.seed + len(done))
    model, tokenizer = load_causal_lm(args.generator).to(device()), load_tokenizer(args.generator)
    stopping.keep(f"the candidates written to {path} (rerun the same command to resume)")
    with token_bar("sampling candidates") as bar:
        for start in range(0, len(todo), args.gen_batch_size):
            batch = todo[start:start + args.gen_batch_size]
            prompts = [generation_prompt_ids(tokenizer, [{"role": "user", "content": p["question"]},
                                                         {"role": "assistant", "content": ""}]) for p in batch]
            # top_k=0: only --gen-temperature shapes the sampling, not Hugging Face's default top_k of 50.
            answers = generate_from_prompts(model, tokenizer, prompts, args.gen_max_new_tokens, progress=bar, do_sample=True,
                                            temperature=args.gen_temperature, top_k=0, num_return_sequences=args.n)
            rows = []
            for i, problem in enumerate(batch):
                candidates = []
                for solution in answers[i * args.n:(i + 1) * args.n]:
                    answer, correct = final_answer(solution, problem["reference"])
                    candidates.append({"solution": solution, "answer": answer, "correct": correct})
                rows.append({"question_id": problem["question_id"], "question": problem["question"], "candidates": candidates})
            append_rows(path, rows)
            bar.set_postfix_str(f"{start + len(batch)}/{len(todo)} problems")


def _numbered_lines(file: Path) -> Iterator[tuple[int, str]]:
    """(1-based number, text) of each line of a ``.jsonl`` or ``.jsonl.gz`` file.

    Raises:
        DataError: the file is not gzip (or is truncated) or not UTF-8 text; the message names it and the line.
    """
    number = 0
    try:
        with (gzip.open if file.suffix == ".gz" else open)(file, "rb") as handle:
            for number, line in enumerate(handle, start=1):
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(f"{file} line {number}: not UTF-8 text ({exc.reason})") from None
                yield number, text
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataError(f"{file}: not a readable gzip file ({exc}); after line {number}") from None


def read_labeled_candidates(source: Path, num_problems: int, n: int, seed: int = 0,
                            mixed_only: bool = False) -> list[dict]:
    """Labeled candidates from data_collection-style rows (``question_id``, ``question``, ``model_output``,
    ``correctness``, ``extracted_answer``, ``model_output_id``), ``n`` per problem.

    The release splits a question's candidates into a correct and an incorrect file, so keeping the first ``n``
    rows read would fill most problems with correct candidates only. Instead every candidate of a question is
    pooled across all files (deduplicated: the same ``model_output_id`` and solution under another critique),
    put in a fixed order, and ``n`` of them are drawn with ``random.Random(f"{seed}-{question_id}")``: the sample
    depends on the seed and the question's candidates, not on the files' or rows' order, nor on which other
    questions are evaluated.

    Args:
        source: a data_collection folder (every ``*.jsonl*`` in it) or one ``.jsonl(.gz)`` file.
        num_problems: how many problems, the first in question-id order among those that qualify.
        n: candidates per problem; a problem with fewer does not qualify.
        seed: seeds each problem's sample.
        mixed_only: only problems with both correct and incorrect candidates (in the pool, before sampling) qualify.

    Returns:
        ``{question_id, question, candidates: [{solution, answer, correct}]}`` per problem.
    """
    files = sorted(source.glob("*.jsonl*")) if source.is_dir() else [source]
    if not files:
        raise DataError(f"--candidates {source}: no .jsonl or .jsonl.gz files")
    by_question: dict[str, dict] = {}
    seen: dict[tuple[str, str, str], tuple[bool, str]] = {}  # candidate -> (its label, where it was first read)
    for file in files:
        for number, line in _numbered_lines(file):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                qid, output = str(row["question_id"]), row["model_output"]
                correct = str(row["correctness"]).strip().lower() in ("1", "true", "yes")
                question = row["question"]
            except KeyError as exc:
                raise DataError(f"{file} row {number}: not a labeled candidate (no {exc.args[0]!r} column)") from None
            except (json.JSONDecodeError, TypeError) as exc:
                raise DataError(f"{file} row {number}: not a labeled candidate ({exc!r})") from None
            # The id and the text: ids alone might repeat across files, the text alone across samples.
            key = (qid, str(row.get("model_output_id", "")), output)
            if key in seen:  # the same solution with another critique
                if seen[key][0] != correct:
                    raise DataError(f"{file} row {number}: candidate {key[1]!r} of question {qid} "
                                    f"is labeled {correct}, but {not correct} in {seen[key][1]}")
                continue
            seen[key] = (correct, f"{file} row {number}")
            entry = by_question.setdefault(qid, {"question_id": qid, "question": question, "pool": []})
            entry["pool"].append((key, {"solution": output, "answer": str(row.get("extracted_answer", "")),
                                        "correct": correct}))
    ordered = sorted(by_question.values(), key=lambda e: (len(e["question_id"]), e["question_id"]))
    enough = [e for e in ordered if len(e["pool"]) >= n]
    mixed = [e for e in enough if len({c["correct"] for _, c in e["pool"]}) == 2]
    chosen = []
    for entry in (mixed if mixed_only else enough)[:num_problems]:
        pool = [c for _, c in sorted(entry["pool"], key=lambda kc: kc[0])]  # file order must not matter
        sample = random.Random(f"{seed}-{entry['question_id']}").sample(pool, n)
        chosen.append({"question_id": entry["question_id"], "question": entry["question"], "candidates": sample})
    n_correct = sum(c["correct"] for p in chosen for c in p["candidates"])
    n_both = sum(len({c["correct"] for c in p["candidates"]}) == 2 for p in chosen)
    print(f"--candidates {source}: {len(ordered)} questions, {len(enough)} with at least {n} candidates, "
          f"{len(mixed)} of those with both correct and incorrect candidates"
          + (" (--mixed-only: only these)" if mixed_only else ""))
    print(f"sampled {n} per question (seed {seed}) for {len(chosen)} questions: {n_correct} correct and "
          f"{len(chosen) * n - n_correct} incorrect candidates; {n_both} questions have both in their sample")
    return chosen


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ---- scoring -----------------------------------------------------------------------------------------------

def score_candidates(args: argparse.Namespace, problems: list[dict], path: Path) -> dict[tuple[str, int], dict]:
    """Verifier samples of every candidate, appended to ``path`` per batch and read back on a rerun."""
    from extension.verifier import score_solutions
    from models import load_causal_lm, load_tokenizer, token_bar

    scored = {(r["question_id"], r["index"]): r for r in read_rows(path, keys=("question_id", "index"))}
    todo = [(p["question_id"], i, p["question"], c["solution"]) for p in problems
            for i, c in enumerate(p["candidates"]) if (p["question_id"], i) not in scored]
    if todo:
        model = load_causal_lm(args.verifier).to(device()).eval()
        static_cache = args.cuda_graphs and device() == "cuda"
        tokenizer = load_tokenizer(args.verifier)
        k_min = args.k_max if args.compare_fixed_k else args.k_min
        stopping.keep(f"the verifier scores written to {path} (rerun the same command to resume)")
        with token_bar("verifying candidates (rationale tokens)") as bar:
            for start in range(0, len(todo), args.prompts_per_batch):
                batch = todo[start:start + args.prompts_per_batch]
                scores = score_solutions(model, tokenizer, [q for _, _, q, _ in batch], [s for _, _, _, s in batch],
                                         k_min=k_min, k_max=args.k_max, tau=args.tau,
                                         temperature=args.verifier_temperature, max_new_tokens=args.verifier_max_new_tokens,
                                         prompts_per_batch=args.prompts_per_batch, seed=args.seed + len(scored) + start,
                                         progress=bar, static_cache=static_cache)
                rows = [{"question_id": qid, "index": index, "p_yes": score.p_yes, "p_normalized": score.p_normalized,
                         "rationale": score.rationales[0]} for (qid, index, _, _), score in zip(batch, scores)]
                scored.update({(row["question_id"], row["index"]): row for row in rows})
                append_rows(path, rows)
                bar.set_postfix_str(f"{start + len(batch)}/{len(todo)} candidates")
    return scored


# ---- the report --------------------------------------------------------------------------------------------

def pick(values: list[float]) -> int:
    """Index of the highest value, the earliest on ties."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def majority(answers: list[str]) -> int:
    """Index of the first candidate with the most frequent non-empty final answer (0 if none has one)."""
    counts = Counter(a for a in answers if a)
    if not counts:
        return 0
    top = max(counts.values())
    return next(i for i, a in enumerate(answers) if a and counts[a] == top)


def best_of_n_table(problems: list[dict], scores: dict[str, list[list[float]]], n_max: int) -> list[dict]:
    """Accuracy per N = 1, 2, 4, ..., n_max of each method, averaged over the n_max / N disjoint groups of every
    problem. ``scores`` maps a method name to each problem's candidate scores."""
    table = []
    n = 1
    while n <= n_max:
        totals: dict[str, float] = defaultdict(float)
        for p, problem in enumerate(problems):
            correct = [c["correct"] for c in problem["candidates"]]
            answers = [c["answer"] for c in problem["candidates"]]
            groups = [range(g, g + n) for g in range(0, n_max, n)]
            for group in groups:
                idx = list(group)
                totals["first sample"] += correct[idx[0]] / len(groups)
                totals["majority vote"] += correct[idx[majority([answers[i] for i in idx])]] / len(groups)
                for name, values in scores.items():
                    totals[name] += correct[idx[pick([values[p][i] for i in idx])]] / len(groups)
                totals["oracle"] += any(correct[i] for i in idx) / len(groups)
        table.append({"N": n, **{k: v / len(problems) for k, v in totals.items()}})
        n *= 2
    return table


def report(args: argparse.Namespace, problems: list[dict], scored: dict[tuple[str, int], dict]) -> dict:
    rows = [[scored[(p["question_id"], i)] for i in range(len(p["candidates"]))] for p in problems]
    labels = [c["correct"] for p in problems for c in p["candidates"]]
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    adaptive_ks = [[adaptive_k(r["p_yes"], args.k_min, args.k_max, args.tau) for r in row] for row in rows]
    adaptive = [[mean(r["p_yes"][:k]) for r, k in zip(row, ks)] for row, ks in zip(rows, adaptive_ks)]
    methods = {"verifier (adaptive K)": adaptive}
    results: dict = {"problems": len(problems), "candidates_per_problem": args.n,
                     "candidate_accuracy": mean(labels),
                     "auc": auc([s for row in adaptive for s in row], labels),
                     "auc_normalized": auc([mean(r["p_normalized"][:k]) for row, ks in zip(rows, adaptive_ks)
                                            for r, k in zip(row, ks)], labels),
                     "mean_rationales_adaptive": mean([k for ks in adaptive_ks for k in ks])}
    if args.compare_fixed_k:
        fixed = [[mean(r["p_yes"]) for r in row] for row in rows]
        methods[f"verifier (K={args.k_max})"] = fixed
        flat_a, flat_f = [s for row in adaptive for s in row], [s for row in fixed for s in row]
        results["auc_fixed_k"] = auc(flat_f, labels)
        results["decision_agreement"] = mean([(a >= 0.5) == (f >= 0.5) for a, f in zip(flat_a, flat_f)])
        results["pick_agreement"] = mean([pick(a) == pick(f) for a, f in zip(adaptive, fixed)])
        results["rationales_fixed_k"] = args.k_max
    results["table"] = best_of_n_table(problems, methods, args.n)
    return results


def write_outputs(results: dict, out: Path) -> None:
    write_json(out / "results.json", results)
    table = results["table"]
    names = [k for k in table[0] if k != "N"]
    lines = ["| N | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {row['N']} | " + " | ".join(f"{100 * row[k]:.1f}%" for k in names) + " |" for row in table]
    notes = [f"{results['problems']} problems, {results['candidates_per_problem']} candidates each, "
             f"{100 * results['candidate_accuracy']:.1f}% of candidates correct.",
             f"Verifier AUC: {fmt(results['auc'])} (p('Yes'), adaptive K), {fmt(results['auc_normalized'])} (Yes/(Yes+No)).",
             f"Adaptive K: {results['mean_rationales_adaptive']:.1f} rationales per candidate on average."]
    if "decision_agreement" in results:
        notes.append(f"Against fixed K={results['rationales_fixed_k']} (AUC {fmt(results['auc_fixed_k'])}): "
                     f"decisions (score >= 0.5) agree on {100 * results['decision_agreement']:.1f}% of candidates, "
                     f"Best-of-{results['candidates_per_problem']} picks on {100 * results['pick_agreement']:.1f}% of problems.")
    write_text(out / "table.md", "\n".join(lines + [""] + notes) + "\n")
    print("\n".join(lines + [""] + notes))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for name in names:
        axes.plot([row["N"] for row in table], [100 * row[name] for row in table], marker="o", label=name)
    axes.set_xscale("log", base=2)
    axes.set_xticks([row["N"] for row in table], [str(row["N"]) for row in table])
    axes.set_xlabel("N (candidates per problem)")
    axes.set_ylabel("accuracy (%)")
    axes.set_title("Best-of-N")
    axes.legend()
    figure.tight_layout()
    figure.savefig(out / "best_of_n.png", dpi=120)
    plt.close(figure)


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


# Settings the saved candidates and scores depend on: a rerun into the same --output-dir must keep them.
RESUME_SETTINGS = ("verifier", "generator", "candidates", "mixed_only", "dataset", "synthetic_levels", "n", "gen_temperature",
                   "gen_max_new_tokens", "k_min", "k_max", "tau", "compare_fixed_k", "verifier_temperature",
                   "verifier_max_new_tokens", "seed")


@stopping.stop_on_signals("best_of_n.py")
def main(argv: list[str] | None = None) -> dict:
    redact_output()  # everything printed or logged from here on passes through secrets_guard.redact
    args = parse_args(argv)
    started = time.time()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        # The inputs are read before settings.json records them: a bad one leaves nothing that blocks a rerun.
        if args.candidates:
            problems = read_labeled_candidates(Path(args.candidates), args.num_problems, args.n, args.seed, args.mixed_only)
            if not problems:
                raise DataError(f"--candidates {args.candidates}: no question has {args.n} candidates"
                                + (" with both correct and incorrect ones (--mixed-only)" if args.mixed_only else ""))
        else:
            problems = load_problems(args.dataset, "test", args.num_problems, args.seed, args.synthetic_levels)
        save_or_check_settings(out / "settings.json", {k: getattr(args, k) for k in RESUME_SETTINGS}, "--output-dir", out)
        if not args.candidates:
            generate_candidates(args, problems, out / "candidates.jsonl")
            problems = read_rows(out / "candidates.jsonl")[: args.num_problems]
        scored = score_candidates(args, problems, out / "scores.jsonl")
    except (ConfigError, DataError, OSError) as exc:  # bad input: one line, exit status 2
        fail("best_of_n.py", exc)
    results = report(args, problems, scored)
    results["minutes"] = round((time.time() - started) / 60, 2)
    write_outputs(results, out)
    print(f"results in {out} (table.md, results.json, best_of_n.png); {results['minutes']} min")
    return results


if __name__ == "__main__":
    main()
