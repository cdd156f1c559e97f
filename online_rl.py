"""Online RL: ``--training-type rloo`` and ``--training-type grpo``, one objective each, sharing this loss.

Each training step, for a micro-batch of P prompts:

1. Rollouts: the policy samples K = --num-generations answers per prompt (no gradient) with ``sampling.PrefixSampler``
   (one prefill per prompt, the K rows decoded together), at --temperature / --top-p, up to --max-new-tokens; or, on
   a GPU with vLLM installed (--rollout-engine), with vLLM's offline engine, the policy's weights pushed to it
   after each update (``VLLMEngine``).
2. Rewards: every --reward source scores every answer; the weighted sum is the reward (``rewards.Rewards``).
3. KL to the frozen reference (--kl-coef > 0): per token, estimator k1/k2/k3 (``losses.rl.kl_estimate``); summed
   over the answer and subtracted from the reward (--kl-placement reward, RLOO's form), or added per token to the
   loss (--kl-placement loss, GRPO's).
4. Advantages over the K answers of each prompt (``losses.rl.advantages``): leave-one-out (rloo), group-normalised
   (grpo) or group-centred (dr_grpo).
5. The loss: ``losses.rl.policy_gradient_loss`` per answer token (REINFORCE, or PPO's clipped ratio when
   --updates-per-rollout > 1 reuses a batch of rollouts), reduced without length bias (--loss-normalization):

       sequence:  (1 / (P K)) sum_i sum_t l_it                  the REINFORCE objective of whole answers (RLOO)
       constant:  (1 / (P K T_max)) sum_i sum_t l_it            Dr. GRPO's constant, T_max = --max-new-tokens
       token:     (1 / sum_i |y_i|) sum_i sum_t l_it            DAPO's token mean, over the micro-batch's tokens

   The module averages the micro-batches of an accumulation window over their prompts (units: one per prompt).
   The log-probs (loss, KL, PPO's old policy) read the policy at --loss-temperature, by default the sampling
   temperature, so that the answers are samples of the policy the loss differentiates (as TRL and OpenRLHF do).
   The pass with gradient runs each prompt once and its answers over its KV cache (``answer_logprobs``,
   --share-prompt-pass).

Every rollout, with its rewards per source, is written to ``<run>/rollouts/step-N.jsonl`` (validation:
``val-step-N.jsonl``). Every rank's sampler state is saved in checkpoints, so a resumed run draws the same rollouts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from collate_functions import INVALID_PROMPT, SFTCollator, generation_prompt_ids
from losses.logprobs import IGNORE_INDEX, shared_prompt_exact, shared_prompt_logprobs, shift_labels, token_logprobs
from losses.rl import advantages, kl_estimate, policy_gradient_loss, zero_gradient_share
from models import load_causal_lm, stop_token_ids
from objectives import LossOutput, Objective, validate_answers
from precision import sampling_autocast, sequence_multiple
from sampling import Continuation

# ---- data: prompts, left-padded ---------------------------------------------------------------------------

def tokenize_prompt(tokenizer, row: dict, max_length: int, overlong: str) -> tuple[dict | None, str]:
    """A row's conversation up to its final answer, as generation-prompt token ids; its reference and columns ride
    along for the rewards. A prompt that fills --max-length leaves no room to answer: invalid."""
    ids = generation_prompt_ids(tokenizer, row["messages"])
    if len(ids) >= max_length:
        return None, INVALID_PROMPT
    return {"input_ids": ids, "prompt": row["messages"][:-1], "reference": row.get("reference", ""),
            "columns": row.get("columns", {}), "row": row.get("row", -1)}, "ok"


class PromptCollator:
    """Left-pads a micro-batch of prompts (``input_ids``, ``attention_mask``) and keeps what the rewards read."""

    def __init__(self, pad_token_id: int, multiple: int = 1):
        self.pad_token_id = pad_token_id  # prompts are never a training forward pass: ``multiple`` is not needed

    def __call__(self, features: list[dict]) -> dict:
        from models import left_pad

        input_ids, attention_mask = left_pad([f["input_ids"] for f in features], self.pad_token_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "prompts": [f["prompt"] for f in features], "references": [f["reference"] for f in features],
                "columns": [f["columns"] for f in features], "rows": [f["row"] for f in features]}


def one_prompt(feature: dict) -> int:
    """Online RL averages over prompts."""
    return 1


# ---- rollouts ---------------------------------------------------------------------------------------------

@dataclass
class Rollout:
    """K sampled answers to each of P prompts, as one right-padded batch of N = P K sequences (prompt + answer), and
    their rewards. ``labels`` hold the answer tokens (-100 elsewhere), so ``token_logprobs`` reads exactly those."""

    input_ids: torch.Tensor  # (N, L)
    attention_mask: torch.Tensor  # (N, L)
    labels: torch.Tensor  # (N, L)
    rewards: torch.Tensor  # (P, K) combined
    source_rewards: dict[str, list[float | None]]
    texts: list[str]
    truncated: torch.Tensor  # (N,) bool: hit --max-new-tokens
    entropy: torch.Tensor  # (N,) mean entropy per answer token of the sampling distribution
    lengths: torch.Tensor  # (N,) answer tokens
    prompt_lengths: torch.Tensor | None = None  # (N,) prompt tokens of each row, set where the prompt pass is shared
    old_logps: torch.Tensor | None = None  # (N, L-1) log-probs at the first update (--updates-per-rollout > 1)
    advantages: torch.Tensor | None = None  # (N,)
    uses: int = 0

    def to(self, device) -> Rollout:
        """The same rollout with its tensors on ``device`` (a checkpoint keeps them on the CPU)."""
        return Rollout(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()})


class VLLMEngine:
    """Rollouts from vLLM's offline engine (--rollout-engine vllm, or auto on a CUDA machine with vLLM installed).
    The engine keeps its own copy of the weights: the policy's are pushed to it before the first rollout after each
    optimizer step (in-process, as TRL's colocate mode does). Its answers come with their finish reason; the entropy
    of their distributions is not read (logged as 0).

    Args:
        llm: a ``vllm.LLM`` (tests pass a stand-in).
        sampling_params: ``vllm.SamplingParams`` (or a stand-in).
    """

    def __init__(self, llm, sampling_params):
        self.llm, self.sampling_params = llm, sampling_params
        self.pushed_step: int | None = None

    @classmethod
    def load(cls, cfg) -> VLLMEngine:
        from vllm import LLM, SamplingParams

        from models import resolve_model_path

        return cls(LLM(model=resolve_model_path(cfg.model_name), seed=cfg.seed, enable_prefix_caching=True,
                       gpu_memory_utilization=cfg.vllm_gpu_memory_utilization), SamplingParams)

    def push_weights(self, model, step: int) -> None:
        """Load the policy's current weights into the engine, once per optimizer step."""
        if self.pushed_step == step:
            return
        engine_model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        engine_model.load_weights((name, weight.detach()) for name, weight in model.state_dict().items())
        self.pushed_step = step

    def sample(self, prompts: list[list[int]], k: int, stop_ids: set[int], max_new_tokens: int, temperature: float,
               top_p: float, seed: int) -> list[list[Continuation]]:
        params = self.sampling_params(n=k, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                                      stop_token_ids=sorted(stop_ids), seed=seed)
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [[Continuation(list(o.token_ids), "length" if o.finish_reason == "length" else "stop") for o in out.outputs]
                for out in outputs]


def vllm_usable() -> bool:
    """vLLM installed and a CUDA device present."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


class Rollouts:
    """The per-run state of online RL (``Objective.setup``): the sampler's random generator, the reward sources
    (built on first use, their reward models and verifiers loaded onto the policy's device), the rollouts kept for
    --updates-per-rollout > 1, and the rollout files. ``state_dict``/``load_state_dict`` go into checkpoints."""

    def __init__(self, module):
        self.module, self.cfg, self.tokenizer = module, module.cfg, module.tokenizer
        self.stop_ids = stop_token_ids(self.tokenizer)
        self.generator: torch.Generator | None = None
        self._generator_state: torch.Tensor | None = None  # restored from a checkpoint before the generator exists
        self.rewards = None
        self.kept: dict[tuple, Rollout] = {}
        self._written: set[str] = set()
        self.share_prompt = shares_prompt_pass(self.cfg, module.model)
        use_vllm = self.cfg.rollout_engine == "vllm" or (self.cfg.rollout_engine == "auto" and vllm_usable())
        self.engine = VLLMEngine.load(self.cfg) if use_vllm else None  # None: sampling.PrefixSampler
        self._pending: tuple[list, Rollout] | None = None  # (dataset rows, rollout) drawn by ``prepare``

    # -- checkpoint state
    def state_dict(self) -> dict:
        """This rank's state (the module gathers every rank's into the checkpoint), tensors on the CPU."""
        state = self.generator.get_state() if self.generator is not None else self._generator_state
        return {"generator": state, "kept": {k: vars(v.to("cpu")) for k, v in self.kept.items()}}

    def load_state_dict(self, state: dict) -> None:
        self._generator_state = state.get("generator")
        self.generator = None
        self.kept = {k: Rollout(**v) for k, v in state.get("kept", {}).items()}

    def _train_generator(self, device: torch.device) -> torch.Generator:
        if self.generator is None:
            rank = self.module.global_rank if self.module._trainer is not None else 0
            self.generator = torch.Generator(device).manual_seed(self.cfg.seed * 1_000_003 + rank)
            if self._generator_state is not None:
                self.generator.set_state(self._generator_state)
        return self.generator

    # -- one batch
    def prepare(self, model, batch: dict) -> None:
        """Draw the rollout of ``batch`` before its training or validation step (the module's batch-start hooks): the
        step runs inside the strategy's forward, where FSDP cannot gather the weights that sampling needs."""
        self._pending = (batch["rows"], self.draw(model, batch))

    def __call__(self, model, batch: dict) -> Rollout:
        """The rollout of ``batch``: the one ``prepare`` drew for it, else drawn now (``draw``)."""
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == batch["rows"]:
            return pending[1]
        return self.draw(model, batch)

    def draw(self, model, batch: dict) -> Rollout:
        """The rollout of ``batch``: sampled and rewarded, or the one kept for it while --updates-per-rollout lasts."""
        training = self.module._trainer is not None and self.module.trainer.training
        key = tuple(batch["rows"]) if training and self.cfg.updates_per_rollout > 1 else None
        if key is not None and key in self.kept:
            rollout = self.kept[key] = self.kept[key].to(next(model.parameters()).device)
        else:
            rollout = self.sample(model, batch, training)
            if key is not None:
                self.kept[key] = rollout
        rollout.uses += 1
        if key is not None and rollout.uses >= self.cfg.updates_per_rollout:
            self.kept.pop(key, None)
        return rollout

    @torch.no_grad()
    def sample(self, model, batch: dict, training: bool = True) -> Rollout:
        from rewards import RolloutBatch, build
        from sampling import PrefixSampler

        cfg, k = self.cfg, self.cfg.num_generations
        device = next(model.parameters()).device
        if self.rewards is None:
            self.rewards = build(cfg.reward, cfg.reward_weights, cfg, cfg.run_dir, device)
        mask = batch["attention_mask"]
        prompts = [row[mask[i].bool()].tolist() for i, row in enumerate(batch["input_ids"])]
        if training:
            generator = self._train_generator(device)
        else:  # validation draws from its own seed per step: the training stream is the same with or without it
            generator = torch.Generator(device).manual_seed(cfg.seed + 7919 * (self.module.global_step + 1))
        if self.engine is not None:
            with self.module.full_weights():
                self.engine.push_weights(model, self.module.global_step)
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=device))
            groups = self.engine.sample(prompts, k, self.stop_ids, cfg.max_new_tokens, cfg.temperature, cfg.top_p, seed)
        else:
            static = self.module.graph_decoding()
            with self.module.full_weights(), sampling_autocast(cfg.precision, device, static):
                sampler = PrefixSampler(model, prompts, self.tokenizer.pad_token_id, cfg.temperature, cfg.top_p,
                                        generator=generator, sync=self.module.sampling_sync(), static_cache=static)
                groups = sampler.sample(list(range(len(prompts))), k, self.stop_ids, cfg.max_new_tokens)
        answers = [a for group in groups for a in group]
        texts = [self.tokenizer.decode(a.tokens, skip_special_tokens=True).strip() for a in answers]
        every = [i // k for i in range(len(answers))]  # prompt of each answer
        rows = RolloutBatch([batch["prompts"][p] for p in every], texts, [batch["references"][p] for p in every],
                            {c: [batch["columns"][p].get(c) for p in every] for c in (batch["columns"][0] or {})})
        combined, per_source = self.rewards(rows)
        input_ids, attention, labels = answer_batch(prompts, [a.tokens for a in answers], k, self.tokenizer.pad_token_id,
                                                    sequence_multiple(cfg.precision))
        lengths = torch.tensor([len(a.tokens) for a in answers])
        entropy = torch.tensor([a.entropy for a in answers], dtype=torch.float32) / lengths.clamp(min=1)
        rollout = Rollout(input_ids.to(device), attention.to(device), labels.to(device),
                          torch.tensor(combined, dtype=torch.float32, device=device).view(len(prompts), k), per_source,
                          texts, torch.tensor([a.finish == "length" for a in answers], device=device),
                          entropy.to(device), lengths.to(device))
        if self.share_prompt:
            rollout.prompt_lengths = torch.tensor([len(prompts[p]) for p in every], device=device)
        self.save(rollout, batch, every, training)
        return rollout

    def save(self, rollout: Rollout, batch: dict, every: list[int], training: bool) -> None:
        """Append the rollout's rows to this step's file (started over when this process first writes it)."""
        from resumable import append_rows

        step = self.module.global_step
        name = f"step-{step}" if training else f"val-step-{step}"
        world = self.module.trainer.world_size if self.module._trainer is not None else 1
        if world > 1:
            name += f".rank-{self.module.global_rank}"
        path = self.cfg.run_dir / "rollouts" / f"{name}.jsonl"
        if str(path) not in self._written:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)
            self._written.add(str(path))
        k = self.cfg.num_generations
        append_rows(path, [
            {"step": step, "row": batch["rows"][p], "sample": i % k, "prompt": batch["prompts"][p][-1]["content"],
             "completion": text, "reward": float(rollout.rewards.view(-1)[i]),
             "rewards": {s: v[i] for s, v in rollout.source_rewards.items()},
             "tokens": int(rollout.lengths[i]), "truncated": bool(rollout.truncated[i])}
            for i, (p, text) in enumerate(zip(every, rollout.texts))])


def answer_batch(prompts: list[list[int]], answers: list[list[int]], k: int, pad_id: int, multiple: int = 1
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt + answer of every answer (answer i answers prompt i // k) as one right-padded batch: ids, attention
    mask and labels (the answer's tokens; -100 on the prompt and padding), its width a multiple of ``multiple``
    (``precision.sequence_multiple``)."""
    batch = SFTCollator(pad_id, multiple)([
        {"input_ids": prompts[i // k] + answer, "labels": [IGNORE_INDEX] * len(prompts[i // k]) + answer}
        for i, answer in enumerate(answers)])
    return batch["input_ids"], batch["attention_mask"], batch["labels"]


def shares_prompt_pass(cfg, model) -> bool:
    """Whether the training forward pass runs each prompt once (--share-prompt-pass, ``answer_logprobs``): not under
    FSDP or DeepSpeed (the decoder runs twice in one forward pass), activation checkpointing (it turns the KV cache
    off) or Transformer Engine FP8 (the batch width must stay a multiple of 8), nor for a model it would not read
    exactly (``losses.logprobs.shared_prompt_exact``, at --max-length + --max-new-tokens)."""
    return (cfg.share_prompt_pass and cfg.strategy not in ("fsdp", "deepspeed") and not cfg.activation_checkpointing
            and sequence_multiple(cfg.precision) == 1 and shared_prompt_exact(model, cfg.max_length + cfg.max_new_tokens))


def answer_logprobs(model, r: Rollout, rows: torch.Tensor, k: int, share: bool = True, temperature: float = 1.0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``token_logprobs`` of the rollout's rows ``rows``, in its (n, L-1) layout: log-probs (0 off the answers) and
    the answer mask. The rows are cut to the longest of them (the rest of their width is the other rows' padding).
    Where ``share``, the rollout has ``prompt_lengths`` (``shares_prompt_pass``) and ``model`` is read exactly that
    way (``losses.logprobs.shared_prompt_exact``: the frozen reference is checked too), each prompt runs once and its
    answers over its KV cache (``losses.logprobs.shared_prompt_logprobs``); else each row runs whole. At
    ``temperature``: the log-softmax of logits / temperature."""
    ids, attention, labels = r.input_ids[rows], r.attention_mask[rows], r.labels[rows]
    full = ids.shape[1] - 1
    width = int(attention.sum(-1).max())
    ids, attention, labels = ids[:, :width], attention[:, :width], labels[:, :width]
    starts = lengths = None
    if share and r.prompt_lengths is not None:
        starts, lengths = r.prompt_lengths[rows], r.lengths[rows]
    if starts is None or int(lengths.max()) == 0 or not shared_prompt_exact(model, int(starts.max() + lengths.max())):
        logps, mask = token_logprobs(model, ids, attention, labels, temperature=temperature)
    else:
        _, mask = shift_labels(labels)
        prompts, group = torch.unique(rows // k, return_inverse=True)
        first = torch.zeros(len(prompts), dtype=torch.long, device=rows.device).scatter_(
            0, group, torch.arange(len(rows), device=rows.device))  # a row of each prompt
        prompt_width = int(starts.max())
        prompt_mask = (torch.arange(prompt_width, device=ids.device) < starts[first, None]).long()  # (P, Lp)
        offsets = torch.arange(int(lengths.max()), device=ids.device)
        answer_mask = (offsets < lengths[:, None]).long()  # (n, A)
        answer_ids = ids.gather(1, (starts[:, None] + offsets).clamp(max=width - 1)) * answer_mask
        answer = shared_prompt_logprobs(model, ids[first, :prompt_width] * prompt_mask, prompt_mask, answer_ids,
                                        answer_mask, group, temperature=temperature)  # (n, A)
        logps = torch.zeros(mask.shape, dtype=answer.dtype, device=answer.device)
        logps[mask] = answer[answer_mask.bool()]  # both hold each row's answer tokens in order
    pad = full - logps.shape[1]
    return torch.nn.functional.pad(logps, (0, pad)), torch.nn.functional.pad(mask, (0, pad))


# ---- the loss ---------------------------------------------------------------------------------------------

def rl_objective_loss(model, batch: dict, ref, rollouts: Rollouts, estimator: str, kl_coef: float, kl_estimator: str,
                      kl_placement: str, normalization: str, clip_eps: float, truncated: str, max_new_tokens: int,
                      temperature: float = 1.0, loss_temperature: float | None = None) -> LossOutput:
    """Sample (or reuse) the rollout of ``batch``, then the policy-gradient loss summed over its P prompts (see the
    module docstring); units: P. The log-probs read the policy at ``loss_temperature`` (``logprob_temperature``)."""
    tau = logprob_temperature(temperature, loss_temperature)
    r = rollouts(model, batch)
    prompts, k = r.rewards.shape
    answer = r.labels[:, 1:] != IGNORE_INDEX  # (N, L-1) answer tokens, as token_logprobs masks them
    if truncated == "mask":  # truncated answers neither count nor pull: DAPO's overlong filtering
        answer = answer & ~r.truncated[:, None]
    if r.advantages is None and kl_coef == 0:  # advantages need no forward pass without a KL term
        r.advantages = advantages(r.rewards, estimator).reshape(-1)
    # Without a KL term, an answer of advantage 0 (every answer of a prompt whose K rewards are equal) has loss 0 and
    # gradient 0 whatever its log-probs: it skips the forward and backward passes (one row is kept for the graph).
    rows = torch.arange(len(r.texts), device=r.labels.device)
    trained = len(rows)
    if kl_coef == 0:
        active = rows[r.advantages != 0]
        trained, rows = len(active), active if len(active) else rows[:1]
    # This run's setting: a kept rollout restored from a checkpoint may carry prompt_lengths from a run that shared.
    share = getattr(rollouts, "share_prompt", True)  # (tests pass a plain callable as ``rollouts``)
    logps, mask = answer_logprobs(model, r, rows, k, share, tau)  # with gradient
    mask = mask & answer[rows]
    metrics: dict[str, torch.Tensor] = {"trained_share": torch.tensor(trained / len(r.texts), dtype=torch.float32)}
    kl_tokens = None
    if kl_coef > 0:
        with torch.no_grad():
            ref_logps, _ = answer_logprobs(ref, r, torch.arange(len(r.texts), device=r.labels.device), k, share, tau)
        kl_tokens = kl_estimate(logps, ref_logps, kl_estimator) * mask  # (N, L-1)
        metrics["kl"] = kl_tokens.detach().sum() / mask.sum().clamp(min=1)
    if r.advantages is None:  # the first use of this rollout, with a KL term
        rewards = r.rewards
        if kl_placement == "reward":
            rewards = rewards - kl_coef * kl_tokens.detach().sum(-1).view(prompts, k)
        r.advantages = advantages(rewards, estimator).reshape(-1)
    if r.old_logps is None:  # the policy that sampled the rollout (its first use), for the PPO ratio of later ones
        r.old_logps = torch.zeros(r.labels[:, 1:].shape, dtype=logps.dtype, device=logps.device)  # float32 in bf16
        r.old_logps[rows] = logps.detach()
    token_loss, clipped = policy_gradient_loss(logps, r.old_logps[rows], r.advantages[rows], mask, clip_eps)
    if kl_tokens is not None and kl_placement == "loss":
        token_loss = token_loss + kl_coef * kl_tokens
    if normalization == "sequence":
        loss_sum = token_loss.sum() / k
    elif normalization == "constant":
        loss_sum = token_loss.sum() / (k * max_new_tokens)
    else:  # token: over every answer token of the micro-batch, the skipped ones included
        loss_sum = token_loss.sum() / answer.sum().clamp(min=1) * prompts
    metrics.update(rollout_metrics(r))
    metrics["clipped_share"] = clipped
    return loss_sum, torch.tensor(prompts), metrics


def logprob_temperature(temperature: float, loss_temperature: float | None) -> float:
    """The temperature the loss reads the policy at: --loss-temperature where set, else the sampling --temperature
    (1 for greedy sampling, --temperature 0), so the answers are samples of the distribution the loss differentiates:
    softmax(logits / T), as TRL's RLOO and GRPO trainers and OpenRLHF read it."""
    if loss_temperature is not None:
        return loss_temperature
    return temperature if temperature > 0 else 1.0


def rollout_metrics(r: Rollout) -> dict[str, torch.Tensor]:
    """What a rollout says of the policy: rewards (combined and per source), the share of prompts with no gradient,
    answer length, truncation and entropy."""
    out = {"reward": r.rewards.mean(), "reward_std": r.rewards.std() if r.rewards.numel() > 1 else r.rewards.new_zeros(()),
           "zero_gradient_share": zero_gradient_share(r.rewards),
           "completion_length": r.lengths.float().mean(), "completion_length_max": r.lengths.max().float(),
           "truncated_share": r.truncated.float().mean(), "entropy": r.entropy.mean()}
    for name, values in r.source_rewards.items():
        given = torch.tensor([v for v in values if v is not None], dtype=torch.float32)
        if given.numel():
            out[f"reward_{name}"] = given.mean()
            out[f"reward_{name}_std"] = given.std() if given.numel() > 1 else given.new_zeros(())
    return out


# ---- the objectives ---------------------------------------------------------------------------------------

def needs_reference(cfg) -> bool:
    """A frozen reference only for a KL term: --kl-coef 0 loads none."""
    return cfg.kl_coef > 0


def check(cfg) -> list[str]:
    """The online-RL settings that cannot work, naming the flags."""
    from rewards import spec_problems

    problems = []
    if cfg.num_generations < 2:
        problems.append(f"--num-generations must be at least 2 (the baseline of each answer is the other answers to "
                        f"its prompt), got {cfg.num_generations}")
    if cfg.loss_temperature is not None and cfg.loss_temperature <= 0:
        problems.append(f"--loss-temperature must be above 0 (or unset: the sampling --temperature), got {cfg.loss_temperature}")
    if cfg.temperature < 0 or not 0 < cfg.top_p <= 1:
        problems.append(f"--temperature must be 0 or more and --top-p in (0, 1], got {cfg.temperature} and {cfg.top_p}")
    if cfg.updates_per_rollout < 1:
        problems.append(f"--updates-per-rollout must be at least 1, got {cfg.updates_per_rollout}")
    if cfg.clip_eps <= 0:
        problems.append(f"--clip-eps must be positive, got {cfg.clip_eps}")
    if cfg.kl_coef < 0:
        problems.append(f"--kl-coef must be 0 or more, got {cfg.kl_coef}")
    if cfg.precompute_ref_logps:
        problems.append("--precompute-ref-logps cannot work for online RL: the answers are new every step")
    if cfg.rollout_engine == "vllm" and not cfg.use_ray and not vllm_usable():
        problems.append("--rollout-engine vllm needs vLLM installed (requirements-gpu.txt) and a CUDA GPU; use "
                        "--rollout-engine hf (or auto)")
    if cfg.strategy == "deepspeed" and cfg.zero_stage == 3:
        problems.append("--strategy deepspeed --zero-stage 3 cannot sample rollouts: ZeRO-3 gathers the weights in "
                        "every forward pass, a collective, and the ranks decode answers of different lengths, so they "
                        "would wait on each other for ever; use --zero-stage 2 or --strategy fsdp")
    problems += spec_problems(cfg.reward, cfg.reward_weights)
    if cfg.genrm_gate and not ({"math", "genrm"} <= {s.partition(":")[0] for s in cfg.reward}):
        problems.append("--genrm-gate asks the verifier only where the math reward cannot decide: give both --reward "
                        "math and --reward genrm:PATH")
    return problems


def _objective(name: str, defaults: dict) -> Objective:
    return Objective(
        name=name, data_kind="sft", tokenize=tokenize_prompt, collator=PromptCollator, load_model=load_causal_lm,
        loss=rl_objective_loss, units=one_prompt, validate=validate_answers, uses_reference=needs_reference,
        loss_args={"estimator": "advantage_estimator", "kl_coef": "kl_coef", "kl_estimator": "kl_estimator",
                   "kl_placement": "kl_placement", "normalization": "loss_normalization", "clip_eps": "clip_eps",
                   "truncated": "truncated_answers", "max_new_tokens": "max_new_tokens", "temperature": "temperature",
                   "loss_temperature": "loss_temperature"},
        setup=Rollouts, online=True, defaults=defaults, check=check)


# RLOO (Ahmadian et al. 2024): leave-one-out baseline, sequence-level k1 KL in the reward, REINFORCE of whole answers.
RLOO = _objective("rloo", {"advantage_estimator": "rloo", "kl_coef": 0.05, "kl_estimator": "k1",
                           "kl_placement": "reward", "loss_normalization": "sequence"})
# GRPO (Shao et al. 2024): group-normalised advantages, per-token k3 KL in the loss when --kl-coef > 0 (TRL's default
# is 0), DAPO's token-level normalisation.
GRPO = _objective("grpo", {"advantage_estimator": "grpo", "kl_coef": 0.0, "kl_estimator": "k3",
                           "kl_placement": "loss", "loss_normalization": "token"})

