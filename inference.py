"""Batch inference: prompts in, one jsonl row per prompt out, resumable.

Prompts come from a dataset (as train.py reads it: a hub id, a local file or folder, or synthetic-math; the
conversation before each row's final answer is the prompt, and that answer is kept as ``reference``) or from a
jsonl file of ``{"prompt": str}`` or ``{"messages": [...]}`` rows (optional ``id``). Each output row:
``{id, prompt, completions, completion, reference, model, backend, settings}``.

Backends: vLLM's offline ``LLM`` engine when vLLM is installed and a GPU is present, else the transformers model
through ``sampling.generate_from_prompts`` (batched ``generate`` on a GPU, the shared-prefix sampler on the CPU);
same options and output either way (``--backend`` forces one). A rerun with the same --output
skips the ids already written, so a crash loses at most the batch in flight; it must ask for the same model and
generation settings as the rows there (it stops, naming the setting that differs, rather than mix two runs).

    python inference.py --model-name runs/sft-smollm2-math/final_model --dataset-name synthetic-math \\
        --synthetic-levels 1,2 --limit 100 --output runs/inference/sft.jsonl
    python inference.py --model-name smollm2-135m-instruct --prompts my_prompts.jsonl --n 4 --temperature 0.8 \\
        --output runs/inference/base.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import stopping
from config import ConfigError, TrainConfig, flag_name, redact
from custom_dataset import DataError
from errors import ArgumentParser, fail
from models import model_folder_problem
from resumable import append_rows, check_same_settings, read_rows
from secrets_guard import redact_output, refuse_secret_args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(prog="inference.py", description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-name", required=True, help="Hub id, local folder or the smollm2-135m-instruct alias.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset-name", help="A dataset as for train.py (its test split unless --split train).")
    source.add_argument("--prompts", help="A jsonl file of {prompt} or {messages} rows, optional id.")
    parser.add_argument("--split", choices=("test", "train"), default="test", help="Split of --dataset-name.")
    parser.add_argument("--synthetic-levels", default="1,2,3", help="Levels for --dataset-name synthetic-math.")
    parser.add_argument("--limit", type=int, default=None, help="Only the first N prompts.")
    parser.add_argument("--output", required=True, help="The jsonl file written (appended to on a rerun).")
    parser.add_argument("--n", type=int, default=1, help="Completions per prompt.")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy.")
    parser.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling mass.")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="Token budget of a completion.")
    parser.add_argument("--seed", type=int, default=42, help="Seeds sampling (per batch), and synthetic-math and test-split carving as train.py --seed.")
    parser.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=True,
                        help="Render prompts with the tokenizer's chat template (--no-chat-template: the raw text).")
    parser.add_argument("--batch-size", type=int, default=16, help="Prompts per batch (the resume granularity).")
    parser.add_argument("--backend", choices=("auto", "vllm", "transformers"), default="auto",
                        help="auto: vLLM when installed and a GPU is present, else transformers.")
    args = parser.parse_args(argv)
    refuse_secret_args(parser, args)
    for name in ("n", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"{flag_name(name)} must be at least 1, got {getattr(args, name)}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        parser.error(f"--temperature must be >= 0 and --top-p in (0, 1], got {args.temperature} and {args.top_p}")
    if args.temperature == 0 and args.n > 1:
        parser.error("--n above 1 needs --temperature above 0: greedy decoding gives n identical completions")
    if problem := model_folder_problem(args.model_name):
        parser.error(problem)
    return args


def load_prompts(args: argparse.Namespace) -> list[dict]:
    """{id, messages (the prompt conversation), reference (or None)} of every prompt, in order."""
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise DataError(f"--prompts {path}: no such file")
        rows = []
        for number, line in enumerate(path.read_bytes().splitlines()):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8"))
                messages = row["messages"] if "messages" in row else [{"role": "user", "content": row["prompt"]}]
            except UnicodeDecodeError as exc:
                raise DataError(f"--prompts {path} line {number + 1}: not UTF-8 text ({exc})") from None
            except KeyError as exc:
                raise DataError(f"--prompts {path} line {number + 1}: no {exc.args[0]!r} column (a row holds "
                                "'prompt' or 'messages')") from None
            except (json.JSONDecodeError, TypeError) as exc:
                raise DataError(f"--prompts {path} line {number + 1}: not a {{prompt}} or {{messages}} row ({exc})") from None
            rows.append({"id": str(row.get("id", number)), "messages": messages, "reference": row.get("reference")})
        if not rows:
            raise DataError(f"--prompts {path}: the file holds no prompts (it is empty or blank)")
        return rows[: args.limit]
    from custom_dataset import detect_format, load_raw, normalise

    cfg = TrainConfig(dataset_name=args.dataset_name, synthetic_levels=args.synthetic_levels, seed=args.seed,
                      test_dataset_length=args.limit, train_dataset_length=args.limit)
    raw = load_raw(cfg)[args.split]
    fmt = detect_format(raw.column_names, "auto", args.dataset_name)
    rows = normalise(raw, fmt, args.dataset_name, args.split)[: args.limit]
    return [{"id": str(r["row"]), "messages": r["messages"][:-1], "reference": r["reference"]} for r in rows]


SETTINGS = ("n", "temperature", "top_p", "max_new_tokens", "seed", "chat_template")  # what a row's answers depend on


def check_same_output_settings(path: Path, first: dict, args: argparse.Namespace) -> None:
    """Refuse to append to ``path`` answers generated differently from its first row's (every row holds its model
    and settings): the file would mix two experiments under one name."""
    saved = {"model_name": first.get("model"), **first.get("settings", {})}
    check_same_settings(saved, {"model_name": args.model_name, **{k: getattr(args, k) for k in SETTINGS}}, "--output", path)


def use_vllm(backend: str) -> bool:
    if backend == "transformers":
        return False
    import importlib.util

    import torch

    available = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()
    if backend == "vllm" and not available:
        raise ConfigError(["--backend vllm needs vLLM installed (requirements-gpu.txt) and a CUDA GPU"])
    return available


class TransformersBackend:
    """The transformers model, on the GPU when there is one, answering through ``sampling.generate_from_prompts``."""

    name = "transformers"

    def __init__(self, model_name: str):
        import torch

        from models import load_causal_lm, load_tokenizer

        self.tokenizer = load_tokenizer(model_name)
        self.model = load_causal_lm(model_name).to("cuda" if torch.cuda.is_available() else "cpu").eval()

    def prompt_ids(self, messages: list[dict], chat: bool) -> list[int]:
        from collate_functions import generation_prompt_ids

        if chat:
            return generation_prompt_ids(self.tokenizer, [*messages, {"role": "assistant", "content": ""}])
        return self.tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"]

    def generate(self, batch: list[dict], args: argparse.Namespace, seed: int, progress=None) -> list[list[str]]:
        import torch

        from sampling import generate_from_prompts

        torch.manual_seed(seed)
        # top_k=0 turns off the top-50 cut transformers applies by default (and any the model's generation config
        # sets), so sampling draws from the distribution --temperature and --top-p ask for, as vLLM's does.
        sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p, "top_k": 0} \
            if args.temperature > 0 else {"do_sample": False}
        answers = generate_from_prompts(self.model, self.tokenizer, [self.prompt_ids(r["messages"], args.chat_template) for r in batch],
                                        args.max_new_tokens, progress=progress, num_return_sequences=args.n, **sampling)
        return [answers[i * args.n:(i + 1) * args.n] for i in range(len(batch))]


class VLLMBackend:
    """vLLM's offline engine (GPU)."""

    name = "vllm"

    def __init__(self, model_name: str):
        from vllm import LLM

        from models import resolve_model_path

        self.llm = LLM(model=str(resolve_model_path(model_name)))

    def generate(self, batch: list[dict], args: argparse.Namespace, seed: int, progress=None) -> list[list[str]]:
        from vllm import SamplingParams

        params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_new_tokens,
                                seed=seed)
        if args.chat_template:
            outputs = self.llm.chat([r["messages"] for r in batch], params, use_tqdm=False)
        else:
            outputs = self.llm.generate([r["messages"][-1]["content"] for r in batch], params, use_tqdm=False)
        if progress is not None:  # vLLM generates a batch in one call: its tokens are counted when it returns
            progress.update(sum(len(o.token_ids) for out in outputs for o in out.outputs))
        return [[o.text.strip() for o in out.outputs] for out in outputs]


def run(args: argparse.Namespace) -> dict:
    from models import token_bar

    prompts = load_prompts(args)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    written = read_rows(output, keys=("id",))
    if written:
        check_same_output_settings(output, written[0], args)
    done = {str(row["id"]) for row in written}
    todo = [p for p in prompts if p["id"] not in done]
    print(f"{len(prompts)} prompts, {len(done)} already in {output}, {len(todo)} to generate")
    if not todo:
        return {"written": 0, "skipped": len(done)}
    backend = VLLMBackend(args.model_name) if use_vllm(args.backend) else TransformersBackend(args.model_name)
    settings = {k: getattr(args, k) for k in SETTINGS}
    started, finished = time.time(), 0
    stopping.keep(lambda: f"{len(done) + finished} rows in {output}, each whole (rerun the same command to resume)")
    with token_bar(f"generating ({backend.name})") as bar:
        for start in range(0, len(todo), args.batch_size):
            batch = todo[start:start + args.batch_size]
            stopping.check()  # vLLM's batches cannot be cut short: stop between them
            results = backend.generate(batch, args, seed=args.seed + start + len(done), progress=bar)
            append_rows(output, [{"id": row["id"], "prompt": row["messages"], "completions": texts, "completion": texts[0],
                                  "reference": row["reference"], "model": args.model_name, "backend": backend.name,
                                  "settings": settings} for row, texts in zip(batch, results, strict=True)])
            finished += len(batch)
            bar.set_postfix_str(f"{finished}/{len(todo)} prompts, {finished * args.n / (time.time() - started):.2f} "
                                "completions/s")
    return {"written": len(todo), "skipped": len(done), "seconds": round(time.time() - started, 1)}


@stopping.stop_on_signals("inference.py")
def main(argv: list[str] | None = None) -> dict:
    redact_output()  # everything printed or logged from here on passes through secrets_guard.redact
    args = parse_args(argv)
    try:
        return run(args)
    except (ConfigError, DataError, OSError) as exc:  # bad input: one line, exit status 2
        fail("inference.py", redact(str(exc)))


if __name__ == "__main__":
    main()
