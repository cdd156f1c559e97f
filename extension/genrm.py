"""The GenRM-CoT verifier objective (``--training-type sft_verifier``), registered in ``objectives.OBJECTIVES``.

Training: L = L_SFT(verify) + lambda * L_SFT(correct) (``losses.sft.genrm_loss``), each part averaged over its own
answer tokens. Validation serves the verifier as Best-of-N does: p("Yes") averaged over adaptive-K sampled
rationales (``extension.verifier``), scored against the rows' labels.
"""

from __future__ import annotations

from collate_functions import VerifierCollator, generation_prompt_ids, target_count, tokenize_verifier
from losses.logprobs import token_logprobs
from losses.sft import VERIFIER_PARTS, genrm_loss, genrm_part_sums
from metrics import auc
from models import load_causal_lm
from objectives import LossOutput, Objective, synthetic_sizes


def genrm_objective_loss(model, batch: dict, ref=None) -> LossOutput:
    """The summed SFT loss of each part (verification rationales, correct solutions), (2,), with its tokens (2,);
    the module weighs them with ``losses.sft.genrm_loss`` over the accumulation window."""
    logps, mask = token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    sums, tokens = genrm_part_sums(logps, mask, batch["part"])
    return sums, tokens, {}


def part_units(feature: dict) -> tuple[int, int]:
    """A row's answer tokens, counted in its own part."""
    units = [0, 0]
    units[feature["part"]] = target_count(feature)
    return tuple(units)


def synthetic_verifier_data(cfg):
    """Synthetic verification rows (a one-slip or correct solution with a step-by-step rationale) and correct-solution
    rows. Each problem gives one of each; the held-out problems are the SFT and DPO runs' test problems (the first
    n_test of the stream), so no stage trains on what Best-of-N is evaluated on; the row caps then keep n_train and
    n_test interleaved rows."""
    from custom_dataset import verifier_dataset
    from extension import data_preparation as prep

    n_train, n_test = synthetic_sizes(cfg)
    collected = prep.read_synthetic(n_test + -(-n_train // 2), cfg.seed, cfg.levels(), held_out=n_test)
    return verifier_dataset(prep.build_splits(collected, 0.0, cfg.seed))


def validate_verdicts(module) -> list[dict]:
    """The validation verifier score, served as Best-of-N serves it: p("Yes") averaged over adaptive K sampled
    rationales (--verifier-k-min, --verifier-k-max, --verifier-tau) on the first --val-generate-samples
    verification rows, against their labels (AUC, accuracy at 0.5, mean per label, mean rationales used)."""
    from extension.verifier import score_prompts

    cfg = module.cfg
    rows = [r for r in module.val_set.rows if r["part"] == "verify"][: cfg.val_generate_samples]
    if not rows:
        return []
    scores = score_prompts(
        module.model, module.tokenizer, [generation_prompt_ids(module.tokenizer, r["messages"]) for r in rows],
        k_min=cfg.verifier_k_min, k_max=cfg.verifier_k_max, tau=cfg.verifier_tau,
        temperature=cfg.verifier_temperature, max_new_tokens=cfg.max_new_tokens,
        prompts_per_batch=max(1, cfg.batch_size * 4 // cfg.verifier_k_min), seed=cfg.seed, progress=cfg.verbose,
        static_cache=module.graph_decoding())
    labels = [r["label"] == "Yes" for r in rows]
    values = [s.score for s in scores]
    module.log_metric("val/verifier_accuracy", sum((v >= 0.5) == y for v, y in zip(values, labels)) / len(rows),
                      prog_bar=True)
    module.log_metric("val/verifier_rationales", sum(len(s.p_yes) for s in scores) / len(scores))
    area = auc(values, labels)
    if area is not None:  # both labels present
        module.log_metric("val/verifier_auc", area)
    for label, name in ((True, "yes"), (False, "no")):
        group = [v for v, y in zip(values, labels) if y == label]
        if group:
            module.log_metric(f"val/verifier_score_{name}", sum(group) / len(group))
    return [{"prompt": r["messages"][0]["content"], "label": r["label"], "score": s.score, "normalized": s.normalized,
             "p_yes": s.p_yes, "rationales": s.rationales, "reference": r["reference"]} for r, s in zip(rows, scores)]


OBJECTIVE = Objective(
    name="sft_verifier", data_kind="verifier", tokenize=tokenize_verifier, collator=VerifierCollator,
    load_model=load_causal_lm, loss=genrm_objective_loss, units=part_units, total=genrm_loss,
    total_args={"lam": "lambda_"}, parts=VERIFIER_PARTS, validate=validate_verdicts, synthetic=synthetic_verifier_data,
)


class GenRMReward:
    """Online RL's ``--reward genrm:PATH``: the verifier's r_MajV@K of each answer (mean p("Yes") over an adaptive
    number of sampled rationales, --verifier-k-min/-k-max/-tau/-temperature, --verifier-max-new-tokens), so a run
    can train on prompts with no reference answer at all. Seeded by the answers themselves (``rewards.rollout_seed``):
    a resumed run gets the same rewards for the same rollout."""

    def __init__(self, path: str, cfg, device=None):
        from models import load_tokenizer

        self.model = load_causal_lm(path).eval().requires_grad_(False).to(device or "cpu")  # the policy's device
        self.tokenizer, self.cfg = load_tokenizer(path), cfg

    def __call__(self, batch) -> list[float]:
        from extension.verifier import score_solutions
        from rewards import rollout_seed

        cfg = self.cfg
        on_gpu = next(self.model.parameters()).device.type == "cuda"
        scores = score_solutions(self.model, self.tokenizer, batch.questions, batch.completions, k_min=cfg.verifier_k_min,
                                 k_max=cfg.verifier_k_max, tau=cfg.verifier_tau, temperature=cfg.verifier_temperature,
                                 max_new_tokens=cfg.verifier_max_new_tokens, seed=rollout_seed(batch), progress=False,
                                 static_cache=cfg.cuda_graphs and on_gpu)
        return [s.score for s in scores]
