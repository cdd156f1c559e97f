"""GPU training throughput of SFT and DPO steps: tokens/s, MFU and peak memory, bf16 against FP8.

The model has the architecture of Qwen2.5-0.5B (24 layers, hidden 896, 14 query / 2 key-value heads, MLP 4864,
vocabulary 151,936, tied embeddings), 1.5B (28 layers, hidden 1536, MLP 8960) or 3B (36 layers, hidden 2048, MLP
11008) as ``--model`` says, built from its config with random weights: weights do not change throughput, and
nothing is downloaded (``--config Qwen/Qwen2.5-1.5B`` reads a real config from the hub instead). FP8 pays only
where the GEMMs are wide enough for the FP8 tensor cores to win back the casts and scaling: ``--gemms`` measures
that per layer shape, and the 1.5B and 3B rows show it for whole steps. Sequences are full length (no padding) of random tokens; the first half of each is the prompt (no
loss), so the output head runs on the answer half only, as in our trainer (``losses.logprobs.token_logprobs``).

A step is what our trainer does in ``--precision bf16-true``: forward, loss, backward and a fused AdamW step
on bf16 weights. SFT: ``sft_loss`` over a micro-batch of B sequences. DPO: ``dpo_loss`` over B/2 pairs
(chosen and rejected in one forward, B sequences), the reference log-probabilities precomputed once before
training (the trainer's ``--precompute-ref-logps`` path), so a DPO step costs what an SFT step of the same
tokens costs plus the pair bookkeeping. FP8 converts every decoder linear layer (``precision.convert_to_fp8``;
the output head stays bf16) with Transformer Engine when it is installed, else torchao's float8 (tensorwise
dynamic scaling). ``--compile`` compiles each decoder layer with ``torch.compile`` (one graph shared by all
24 layers); torchao's float8 needs it to fuse its casts. ``--compile-head`` compiles the output head and its
log-softmax (``losses.logprobs.head_logprobs``), so the float32 copy of the 151,936-wide logits is never written.

MFU = model FLOPs per second / the GPU's dense bf16 peak (989.4 TFLOP/s for H100 SXM and H200; FP8 rows are
also measured against the bf16 peak, so they compare directly). Model FLOPs per step, recomputation not
counted: 6 x (decoder linear parameters) x tokens + 6 x (head parameters) x answer positions + causal
attention 6 x T^2 x (heads x head dim) per layer per sequence (half of the full T x T products).

Run (needs a CUDA GPU; about 5 minutes on one H100 with --compile):
    python bench/gpu_throughput.py --compile --compile-head --out runs/bench/gpu_throughput.json
Each configuration's row is written to --out as soon as it is measured, so an interrupted run keeps what it
measured; a configuration that runs out of memory is recorded as such and the others go on.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from typing import Any

for var, value in (("HF_HUB_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(var, value)

import torch  # noqa: E402

from losses.dpo import dpo_loss, sequence_logps  # noqa: E402
from losses.logprobs import IGNORE_INDEX, head_logprobs, token_logprobs  # noqa: E402
from losses.sft import sft_loss  # noqa: E402
from precision import convert_to_fp8, enable_activation_checkpointing, fp8_context, import_te, te_recipe  # noqa: E402
from secrets_guard import redact_output, write_json  # noqa: E402

# The config.json fields that shape compute, of Qwen/Qwen2.5-0.5B, -1.5B and -3B (all tie their embeddings).
_QWEN25 = dict(num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
               rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu")
MODELS = {
    "qwen2.5-0.5b": dict(_QWEN25, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14),
    "qwen2.5-1.5b": dict(_QWEN25, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12),
    "qwen2.5-3b": dict(_QWEN25, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16),
}
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "H200": 989.4, "GH200": 989.4, "A100": 312.0}
DPO_BETA = 0.1
DEVICE = "cuda"  # a module global so a CPU smoke run of the step code can swap it


def model_config(args: argparse.Namespace):
    from transformers import AutoConfig, Qwen2Config

    config = AutoConfig.from_pretrained(args.config) if args.config else Qwen2Config(**MODELS[args.model])
    config.use_cache = False
    return config


def fp8_backend(requested: str) -> str:
    """``te`` when Transformer Engine imports, else ``torchao``; a requested one that is missing is an error."""
    candidates = ("te", "torchao") if requested == "auto" else (requested,)
    for backend in candidates:
        try:
            import_te() if backend == "te" else __import__("torchao.float8")
            return backend
        except ImportError as error:
            missing = error
    raise SystemExit(f"--fp8-backend {requested}: no FP8 backend could be imported ({missing}); install "
                     "transformer-engine or torchao (requirements-gpu.txt)")


def peak_tflops(args: argparse.Namespace) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def step_flops(config, batch: int, seq: int, answer_positions: int) -> float:
    """Model FLOPs of one training step (forward + backward), as in the module docstring."""
    h, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = config.num_key_value_heads * head_dim
    linear = layers * (h * q + 2 * h * kv + q * h + 3 * h * config.intermediate_size)
    attention = layers * 6 * seq * seq * q * batch  # 3 x (QK^T + AV: 2 x 2 x T^2/2 x q)
    return 6 * linear * batch * seq + 6 * config.vocab_size * h * answer_positions + attention


def build(args: argparse.Namespace, precision: str, checkpointing: bool, backend: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(model_config(args), dtype=torch.bfloat16, attn_implementation="sdpa")
    plan = None
    if precision == "fp8":
        plan = convert_to_fp8(model, backend)
    if checkpointing:  # train.py's --activation-checkpointing: under Transformer Engine, through te.checkpoint
        enable_activation_checkpointing(model, backend if precision == "fp8" else None)
    if args.compile:
        for layer in model.get_decoder().layers:
            layer.compile()
    model.train()
    return model, plan


def make_batch(kind: str, batch: int, seq: int, vocab: int) -> dict[str, torch.Tensor]:
    if kind == "dpo" and batch % 2:
        raise ValueError(f"a DPO micro-batch holds chosen and rejected sequences: {batch} is odd")
    ids = torch.randint(0, vocab, (batch, seq), device=DEVICE)
    labels = ids.clone()
    labels[:, : seq // 2] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels}


def loss_of(kind: str, model, batch: dict, context, reference: torch.Tensor | None, head_fn=head_logprobs) -> torch.Tensor:
    with context():
        logps, mask = token_logprobs(model, batch["input_ids"], None, batch["labels"], head_fn=head_fn)
    if kind == "sft":
        return sft_loss(logps, mask)[0]
    pairs = logps.shape[0] // 2
    seq = sequence_logps(logps, mask)
    return dpo_loss(seq[:pairs], seq[pairs:], reference[:pairs], reference[pairs:], DPO_BETA)[0]


def measure(args: argparse.Namespace, kind: str, precision: str, seq: int, micro_batch: int, checkpointing: bool,
            backend: str) -> dict[str, Any]:
    row: dict[str, Any] = {"model": args.config or args.model, "kind": kind,
                           "precision": precision if precision == "bf16" else f"fp8 ({backend})",
                           "seq_len": seq, "micro_batch": micro_batch, "checkpointing": checkpointing,
                           "compiled": args.compile, "compiled_head": args.compile_head}
    model = optimizer = None
    try:
        model, plan = build(args, precision, checkpointing, backend)
        if plan is not None:
            row["fp8_layers"], row["fp8_skipped"] = len(plan.convert), plan.skipped
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        recipe = te_recipe(scaling=args.fp8_recipe) if precision == "fp8" and backend == "te" else None
        fp8 = backend if precision == "fp8" else None
        context = lambda: fp8_context(fp8, recipe)  # noqa: E731  (a fresh context manager per forward)
        batch = make_batch(kind, micro_batch, seq, model.config.vocab_size)
        head_fn = torch.compile(head_logprobs, dynamic=False) if args.compile_head else head_logprobs
        reference = None
        if kind == "dpo":  # precomputed once, as --precompute-ref-logps does
            with torch.no_grad():
                logps, mask = token_logprobs(model, batch["input_ids"], None, batch["labels"])
                reference = sequence_logps(logps, mask).detach()
        answer_positions = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        torch.cuda.reset_peak_memory_stats()
        losses, started = [], None
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                torch.cuda.synchronize()
                started = time.perf_counter()
            loss = loss_of(kind, model, batch, context, reference, head_fn)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - started) / args.steps
        tokens = micro_batch * seq
        flops = step_flops(model.config, micro_batch, seq, answer_positions)
        peak = peak_tflops(args)
        row.update(step_ms=round(seconds * 1e3, 2), tokens_per_s=round(tokens / seconds),
                   model_tflops=round(flops / seconds / 1e12, 1),
                   mfu=round(flops / seconds / 1e12 / peak, 4) if peak else None,
                   peak_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                   loss_first=round(float(losses[0]), 4), loss_last=round(float(losses[-1]), 4))
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
    except Exception as error:  # one failing configuration must not lose the others' measurements
        row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
    finally:
        del model, optimizer
        gc.collect()
        torch.cuda.empty_cache()
    return row


# (layer, in features, out features) of the linear layers of the --model architectures, and Qwen2.5-7B's for
# comparison (hidden 3584, MLP 18944, 4 key-value heads of 128).
GEMM_SHAPES = {
    "Qwen2.5-0.5B": [("q_proj, o_proj", 896, 896), ("k_proj, v_proj", 896, 128), ("gate_proj, up_proj", 896, 4864),
                     ("down_proj", 4864, 896)],
    "Qwen2.5-1.5B": [("q_proj, o_proj", 1536, 1536), ("k_proj, v_proj", 1536, 256), ("gate_proj, up_proj", 1536, 8960),
                     ("down_proj", 8960, 1536)],
    "Qwen2.5-3B": [("q_proj, o_proj", 2048, 2048), ("k_proj, v_proj", 2048, 256), ("gate_proj, up_proj", 2048, 11008),
                   ("down_proj", 11008, 2048)],
    "Qwen2.5-7B": [("q_proj, o_proj", 3584, 3584), ("k_proj, v_proj", 3584, 512), ("gate_proj, up_proj", 3584, 18944),
                   ("down_proj", 18944, 3584)],
}


def cuda_seconds(fn, iters: int = 20, warmup: int = 5) -> float:
    """Mean seconds per call of ``fn`` on the GPU (CUDA events around ``iters`` calls, after ``warmup``)."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def gemm_rows(args: argparse.Namespace, backend: str) -> list[dict[str, Any]]:
    """Why FP8 does or does not pay off at a given width: for each linear layer shape, the bare GEMM (bf16 matmul
    against ``torch._scaled_mm`` on pre-cast FP8 tensors) and the whole training linear (forward and backward, 3
    GEMMs, compiled) in bf16 against the FP8 backend, which also computes amax, scales and casts every operand."""
    rows, tokens = [], args.tokens_per_step
    for model_name, shapes in GEMM_SHAPES.items():
        for layer, fan_in, fan_out in shapes:
            x = torch.randn(tokens, fan_in, device=DEVICE, dtype=torch.bfloat16)
            w = torch.randn(fan_out, fan_in, device=DEVICE, dtype=torch.bfloat16) / fan_in**0.5
            flops = 2 * tokens * fan_in * fan_out
            bf16_gemm = cuda_seconds(lambda x=x, w=w: x @ w.t())
            x8, w8, one = x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn), torch.ones((), device=DEVICE)
            fp8_gemm = cuda_seconds(lambda a=x8, b=w8, one=one: torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one,
                                                                            out_dtype=torch.bfloat16))
            linear = {}
            for precision in ("bf16", "fp8"):
                module = torch.nn.Sequential(torch.nn.Linear(fan_in, fan_out, bias=False, device=DEVICE, dtype=torch.bfloat16))
                if precision == "fp8":
                    convert_to_fp8(module, backend)
                module = torch.compile(module)
                inp = x.clone().requires_grad_(True)
                grad = torch.randn(tokens, fan_out, device=DEVICE, dtype=torch.bfloat16)

                def train_linear(module=module, inp=inp, grad=grad, fp8=backend if precision == "fp8" else None):
                    with fp8_context(fp8):
                        out = module(inp)
                    out.backward(grad)

                linear[precision] = cuda_seconds(train_linear)
            row = {"model": model_name, "layer": layer, "tokens": tokens, "in": fan_in, "out": fan_out,
                   "bf16_gemm_tflops": round(flops / bf16_gemm / 1e12, 1), "fp8_gemm_tflops": round(flops / fp8_gemm / 1e12, 1),
                   "fp8_gemm_speedup": round(bf16_gemm / fp8_gemm, 2),
                   "bf16_linear_ms": round(linear["bf16"] * 1e3, 3), "fp8_linear_ms": round(linear["fp8"] * 1e3, 3),
                   "fp8_linear_speedup": round(linear["bf16"] / linear["fp8"], 2)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def gemm_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | layer (in x out) | bf16 GEMM TFLOP/s | FP8 GEMM TFLOP/s | GEMM speedup | "
             "training linear bf16 ms | FP8 ms | speedup |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['layer']} ({r['in']} x {r['out']}) | {r['bf16_gemm_tflops']} | {r['fp8_gemm_tflops']} | "
              f"{r['fp8_gemm_speedup']}x | {r['bf16_linear_ms']} | {r['fp8_linear_ms']} | {r['fp8_linear_speedup']}x |"
              for r in rows]
    return "\n".join(lines)


def configurations(args: argparse.Namespace) -> list[tuple[str, str, int, int, bool]]:
    """(kind, precision, seq, micro_batch, checkpointing), in the order they run."""
    rows = []
    for kind in args.kinds:
        for seq in args.seq_lens:
            for micro_batch in args.micro_batches or [max(2, args.tokens_per_step // seq)]:
                for checkpointing in args.checkpointing:
                    for precision in args.precisions:
                        rows.append((kind, precision, seq, micro_batch, checkpointing))
    return rows


def compiled_label(row: dict[str, Any]) -> str:
    parts = [name for name, on in (("layers", row["compiled"]), ("head", row.get("compiled_head"))) if on]
    return "+".join(parts) or "no"


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | step | precision | seq | micro-batch | act. ckpt | compiled | tokens/s | MFU | peak GiB |",
             "|---|---|---|---:|---:|---|---|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            result = f"{r['error']} | | "
        else:
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
            result = f"{r['tokens_per_s']:,} | {mfu} | {r['peak_memory_gib']}"
        lines.append(f"| {r.get('model', 'qwen2.5-0.5b')} | {r['kind']} | {r['precision']} | {r['seq_len']} | {r['micro_batch']} | "
                     f"{'on' if r['checkpointing'] else 'off'} | {compiled_label(r)} | {result} |")
    return "\n".join(lines)


def csv(kind):
    return lambda text: [kind(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="qwen2.5-0.5b",
                        help="The architecture measured (random weights; built in, nothing downloaded).")
    parser.add_argument("--config", default=None, help="A hub id or folder whose config to use instead of --model's.")
    parser.add_argument("--kinds", type=csv(str), default=["sft", "dpo"], help="Steps to measure: sft,dpo.")
    parser.add_argument("--seq-lens", type=csv(int), default=[1024, 2048], help="Sequence lengths.")
    parser.add_argument("--precisions", type=csv(str), default=["bf16", "fp8"], help="bf16,fp8.")
    parser.add_argument("--checkpointing", type=csv(lambda x: x == "on"), default=[False, True], help="off,on.")
    parser.add_argument("--tokens-per-step", type=int, default=16384, help="Micro-batch = this / sequence length.")
    parser.add_argument("--micro-batches", type=csv(int), default=None, help="Sequences per micro-batch (overrides --tokens-per-step).")
    parser.add_argument("--fp8-backend", choices=("auto", "te", "torchao"), default="auto")
    parser.add_argument("--fp8-recipe", choices=("current", "delayed"), default="current",
                        help="Transformer Engine scaling (train.py's --fp8-recipe).")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile each decoder layer.")
    parser.add_argument("--compile-head", action=argparse.BooleanOptionalAction, default=False,
                        help="torch.compile the output head and its log-softmax as one graph (losses.logprobs.head_logprobs).")
    parser.add_argument("--warmup", type=int, default=3, help="Steps before the clock starts (compilation, allocator).")
    parser.add_argument("--steps", type=int, default=10, help="Timed steps.")
    parser.add_argument("--gemms", action="store_true", help="Measure each linear layer shape alone (bf16 vs FP8) instead of steps.")
    parser.add_argument("--peak-tflops", type=float, default=None, help="Dense bf16 peak of the GPU (default: from its name).")
    parser.add_argument("--out", default=None, help="JSON results, rewritten after every configuration.")
    args = parser.parse_args(argv)
    for value in args.kinds:
        if value not in ("sft", "dpo"):
            parser.error(f"--kinds: unknown step {value!r} (sft, dpo)")
    for value in args.precisions:
        if value not in ("bf16", "fp8"):
            parser.error(f"--precisions: unknown precision {value!r} (bf16, fp8)")
    if not torch.cuda.is_available():
        parser.error("this bench needs a CUDA GPU (torch.cuda.is_available() is False)")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    redact_output()  # everything printed or logged from here on passes through secrets_guard.redact
    args = parse_args(argv)
    backend = fp8_backend(args.fp8_backend) if "fp8" in args.precisions else None
    if args.compile or args.compile_head:
        from torch._dynamo import config as dynamo

        dynamo.cache_size_limit = 64  # one graph per shape and precision; the layers share them
        dynamo.automatic_dynamic_shapes = False  # static shapes: each sequence length compiles once
    import transformers

    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "transformers": transformers.__version__, "fp8_backend": backend, "peak_bf16_tflops": peak_tflops(args),
        "date": time.strftime("%Y-%m-%d"), "settings": {k: v for k, v in vars(args).items() if k != "out"}, "rows": [],
    }
    if backend == "torchao":
        import torchao

        result["torchao"] = torchao.__version__
    if args.gemms:
        result["gemms"] = gemm_rows(args, backend or fp8_backend(args.fp8_backend))
        if args.out:
            write_json(args.out, result)
        print(gemm_table(result["gemms"]))
        return result
    for kind, precision, seq, micro_batch, checkpointing in configurations(args):
        started = time.perf_counter()
        row = measure(args, kind, precision, seq, micro_batch, checkpointing, backend)
        row["wall_s"] = round(time.perf_counter() - started, 1)
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            write_json(args.out, result)
    print(table(result["rows"]))
    return result


if __name__ == "__main__":
    main()
