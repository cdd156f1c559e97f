"""Math accuracy: final answers checked with math-verify, GSM8K ('#### N') and MATH ('\\boxed{}') references.

Reads predictions written by inference.py (rows with ``completion`` and ``reference``), or first generates them
(greedy, resumable) from --model-name on --dataset-name. Writes ``results.jsonl`` (one row per problem: the
answer read, the gold answer, correct or not) and ``summary.json`` (accuracy with its 95% Wilson interval) to
--output-dir. Equivalent forms count as equal (``0.5`` and ``\\frac{1}{2}``, ``1,000`` and ``1000``). Where the rows
hold several sampled answers each (``inference.py --n N --temperature T``), every one is checked too, and the summary
adds pass@k for k = 1, 2, 4, ... up to N (Chen et al. 2021's unbiased estimator; pass@1 is the mean accuracy of one
sample): how often some of k samples is right, the ceiling of Best-of-k and of what RL can move onto the greedy answer.

    python evaluate_math.py --model-name runs/sft-smollm2-math/final_model --dataset-name synthetic-math \\
        --synthetic-levels 1,2 --limit 100 --output-dir runs/math-sft
    python evaluate_math.py --predictions runs/inference/sft.jsonl --output-dir runs/math-sft
"""

from __future__ import annotations

import argparse
from pathlib import Path

from errors import ArgumentParser, fail
from metrics import check, gold_answer, has_final_answer, parse, pass_at_k, wilson_interval
from secrets_guard import redact_output, refuse_secret_args, write_json, write_jsonl


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(prog="evaluate_math.py", description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--predictions", help="A jsonl written by inference.py (completion and reference per row).")
    source.add_argument("--model-name", help="Generate greedy answers with this model first (needs --dataset-name).")
    parser.add_argument("--dataset-name", help="GSM8K- or MATH-format dataset, as for train.py (its test split).")
    parser.add_argument("--synthetic-levels", default="1,2,3", help="Levels for --dataset-name synthetic-math.")
    parser.add_argument("--limit", type=int, default=None, help="Only the first N problems.")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="Answer budget when generating.")
    parser.add_argument("--batch-size", type=int, default=16, help="Prompts per generation batch.")
    parser.add_argument("--output-dir", required=True, help="results.jsonl and summary.json go here.")
    args = parser.parse_args(argv)
    refuse_secret_args(parser, args)
    if args.model_name and not args.dataset_name:
        parser.error("--model-name needs --dataset-name (the problems to answer)")
    if args.model_name:
        from models import model_folder_problem

        if problem := model_folder_problem(args.model_name):
            parser.error(problem)
    return args


def score(rows: list[dict]) -> tuple[list[dict], dict]:
    """Per-problem results and the summary of prediction rows (``id``, ``completion``, ``reference``; optionally
    ``completions``, all the answers sampled, ``completion`` the first of them)."""

    results = []
    for number, row in enumerate(rows):
        reference = row.get("reference")
        if not isinstance(reference, str) or not has_final_answer(reference):
            raise ValueError(f"prediction row {number} (id {row.get('id')}): its reference has no '#### N' or \\boxed{{}} "
                             "final answer to check against")
        gold = parse(gold_answer(reference))
        answer, correct = check(row["completion"], gold)
        result = {"id": row.get("id", str(number)), "answer": answer, "gold": str(gold[-1]) if gold else "",
                  "correct": correct, "completion": row["completion"]}
        samples = row.get("completions")
        if isinstance(samples, list) and len(samples) > 1:
            result["samples"], result["samples_correct"] = len(samples), sum(check(str(s), gold)[1] for s in samples)
        results.append(result)
    n, right = len(results), sum(r["correct"] for r in results)
    low, high = wilson_interval(right, n)
    summary = {"problems": n, "correct": right, "accuracy": right / n if n else 0.0, "ci95": [low, high]}
    if n and all("samples" in r for r in results):
        fewest = min(r["samples"] for r in results)
        ks = sorted({2 ** i for i in range(fewest.bit_length()) if 2 ** i <= fewest} | {fewest})
        summary["samples_per_problem"] = fewest  # the fewest any row has: pass@k is estimated up to it
        summary["pass_at_k"] = {str(k): sum(pass_at_k(r["samples"], r["samples_correct"], k) for r in results) / n for k in ks}
    return results, summary


def main(argv: list[str] | None = None) -> dict:
    redact_output()  # everything printed or logged from here on passes through secrets_guard.redact
    args = parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    predictions = Path(args.predictions) if args.predictions else out / "predictions.jsonl"
    if args.model_name:
        import inference

        inference.main(["--model-name", args.model_name, "--dataset-name", args.dataset_name, "--synthetic-levels",
                        args.synthetic_levels, "--output", str(predictions), "--max-new-tokens", str(args.max_new_tokens),
                        "--batch-size", str(args.batch_size), *(["--limit", str(args.limit)] if args.limit else [])])
    if not predictions.is_file():
        fail("evaluate_math.py", f"--predictions {predictions}: no such file")
    from resumable import read_rows

    try:
        rows = read_rows(predictions, keys=("completion",))[: args.limit]
        if not rows:
            raise ValueError("holds no predictions (write it with inference.py)")
        results, summary = score(rows)
    except ValueError as exc:  # DataError (a bad line) is a ValueError; its message names the file already
        fail("evaluate_math.py", exc if str(exc).startswith(str(predictions)) else f"{predictions}: {exc}")
    write_jsonl(out / "results.jsonl", results)
    write_json(out / "summary.json", summary)
    low, high = summary["ci95"]
    print(f"accuracy {100 * summary['accuracy']:.1f}% ({summary['correct']}/{summary['problems']}), "
          f"95% CI [{100 * low:.1f}%, {100 * high:.1f}%]; per-problem results in {out / 'results.jsonl'}")
    if "pass_at_k" in summary:
        print(f"pass@k over {summary['samples_per_problem']} samples a problem: "
              + ", ".join(f"pass@{k} {100 * v:.1f}%" for k, v in summary["pass_at_k"].items()))
    return summary


if __name__ == "__main__":
    main()
