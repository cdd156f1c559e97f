"""Sampling several continuations of each prompt from one shared prefill: the decoding loop of online RL's rollouts
(``Rollouts.sample``: K answers per prompt) and of the GenRM-CoT verifier's rationales
(``extension.verifier.RationaleSampler``, which builds on ``PrefixSampler``), and on the CPU of every batched
generation (``generate_from_prompts``, at the end: validation, inference.py, DPO pairs, Best-of-N).

1. At construction the prompts are left-padded and run through the model once, all but their last token: the
   prefix KV cache.
2. A call for n continuations of some prompts copies their cache rows n times and decodes all rows together, token
   by token, sampling with temperature and top-p from a seeded generator. The prompt is never run again, whatever n.
3. After every token a ``choose`` function decides, row by row, the next token to feed or that the row is done.
   Finished rows leave the batch (their cache rows are dropped), so short answers do not wait for long ones.

With ``static_cache=True`` and a token budget (``sample``; ``RationaleSampler``'s budget plus its question), step 2
decodes over a fixed-size KV cache instead (``transformers.StaticCache``, every row kept until all are done, the
attention mask a fixed 4-D tensor updated in place), so every decoding step has the same shapes and addresses. On a
CUDA device that step is then captured once as a CUDA graph and replayed for every later token: one launch a token
instead of one per kernel, which is what a small model's decoding on a GPU is bound by (docs/benchmarks.md). On the
CPU the same static path runs without a graph (it is what the tests compare with the dynamic path). A capture that
fails falls back to running the static step eagerly, with a warning.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import stopping
from losses.logprobs import cache_kwarg, cache_rows

# (rows still decoding, the token sampled for each, the step's logits (R, V)) -> per row the token to feed next,
# or None when the row is finished.
Choose = Callable[[list[int], list[int], torch.Tensor], list[int | None]]


def keeps_last_logits(model) -> dict:
    """The forward kwargs that make ``model`` project only the last position through its output head
    (``logits_to_keep=1``; the prefill would otherwise compute the logits of every prompt position), where it takes
    them."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(type(model).forward).parameters else {}


def plain_head(model) -> torch.nn.Linear | None:
    """``model``'s output head where its logits are exactly ``head.weight @ hidden``: a bias-free ``torch.nn.Linear``
    whose output ``forward`` does not transform (``losses.logprobs.transforms_logits``); None otherwise."""
    from losses.logprobs import transforms_logits

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or head.bias is not None or not hasattr(model, "get_decoder"):
        return None
    return None if transforms_logits(model) else head


class _GrowingLayer:
    """Mixed into ``transformers.DynamicLayer`` (``growing_cache``): the keys and values live in buffers with room for
    ``GROWTH`` more positions, written in place; ``keys``/``values`` are views of the filled part. ``DynamicLayer``
    concatenates each new token onto a copy of the whole cache instead, which on 2 CPU cores took 12% of a decoding
    step of 32 rows of SmolLM2 (docs/online-rl.md)."""

    GROWTH = 64

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.buffers, self.filled = None, 0
        end = self.filled + key_states.shape[-2]
        if self.buffers is None or end > self.buffers[0].shape[-2]:
            shape = (*key_states.shape[:-2], end + self.GROWTH, key_states.shape[-1])
            buffers = tuple(states.new_empty(shape) for states in (key_states, value_states))
            if self.buffers is not None:
                for new, old in zip(buffers, self.buffers):
                    new[..., :self.filled, :] = old[..., :self.filled, :]
            self.buffers = buffers
        self.buffers[0][..., self.filled:end, :] = key_states
        self.buffers[1][..., self.filled:end, :] = value_states
        self.filled = end
        self.keys, self.values = (b[..., :end, :] for b in self.buffers)
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized and self.filled:
            self.buffers = tuple(b[indices] for b in self.buffers)
            self.keys, self.values = (b[..., :self.filled, :] for b in self.buffers)


def growing_cache():
    """An empty ``transformers.DynamicCache`` whose layers grow in place (``_GrowingLayer``) rather than by
    concatenation: the same keys and values, so the same logits."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache()
    if getattr(cache, "layer_class_to_replicate", None) is DynamicLayer and hasattr(DynamicLayer, "lazy_initialization"):
        cache.layer_class_to_replicate = type("GrowingLayer", (_GrowingLayer, DynamicLayer), {})
    return cache  # a transformers whose cache is built otherwise keeps concatenating


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
                  ) -> torch.Tensor:
    """One token per row of ``logits`` (R, V): greedy at temperature 0, else sampled from softmax(logits / T)
    restricted to the smallest set of tokens whose probability reaches ``top_p`` (nucleus sampling; 1 keeps all).

    Sampled by inverting the cumulative distribution (float64) at one uniform number per row: the first token whose
    cumulative mass exceeds u * total, so a token of probability 0 is never drawn. ``torch.multinomial`` draws an
    exponential number per vocabulary entry instead (R * V of them from the generator, one after another on a CPU):
    11% of a decoding step of 32 rows of SmolLM2 on 2 CPU cores, against well under 1% for this."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (R, V)
    if top_p < 1:
        sorted_probs, order = probs.sort(-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens ranked above each
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # the first token always stays
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    cumulative = probs.double().cumsum(-1)  # (R, V)
    target = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=torch.float64)
    drawn = torch.searchsorted(cumulative, target * cumulative[:, -1:], right=True)
    return drawn.squeeze(-1).clamp_(max=probs.shape[-1] - 1)  # u * total < total, so the clamp only guards rounding


@dataclass
class Continuation:
    """One sampled answer: its tokens (a final stop token included), why it ended ("stop" at a stop token, "length"
    at the token budget), and the summed entropy (nats) of the distributions its tokens were drawn from."""

    tokens: list[int] = field(default_factory=list)
    finish: str = ""
    entropy: float = 0.0


class PrefixSampler:
    """Draws continuations of a fixed list of prompts (see the module docstring).

    Args:
        model: a causal LM with a KV cache (``DynamicCache``).
        prompts: token ids of each prompt (at least 2 tokens each).
        pad_id: the id left-padding uses.
        temperature: sampling temperature (0: greedy).
        top_p: nucleus sampling mass (1: none).
        share_prefix: run each prompt once and copy its cache to the samples (True), or run the prompt again for
            every sample, as ``generate(num_return_sequences=K)`` does (False, for benchmarks).
        generator: the random source (its state is the sampler's; a checkpoint can save it), or None to seed a new
            one with ``seed`` on the model's device.
        progress: a ``models.token_bar`` the decoding counts its tokens into (None: no bar).
        sync: for a model sharded across ranks (FSDP), whose every forward pass is a collective: called once per
            decoding step with "this rank still has rows", it returns whether any rank has; a rank whose rows are
            done keeps running a one-token forward pass until then, so the ranks stay in step. None: no other ranks.
        static_cache: decode ``sample``'s rows over a static KV cache, as a CUDA graph on a CUDA device (module
            docstring). Ignored with ``sync`` (a sharded model's forward pass cannot be captured).
    """

    #: dynamic decoding steps run before the static step is captured (CUDA only): the capture needs every lazy
    #: initialisation (cuBLAS workspaces, the cache's tensors) done first.
    warmup_steps = 2

    def __init__(self, model, prompts: list[list[int]], pad_id: int, temperature: float = 1.0, top_p: float = 1.0,
                 share_prefix: bool = True, generator: torch.Generator | None = None, seed: int = 0, progress=None,
                 sync: Callable[[bool], bool] | None = None, static_cache: bool = False):
        if not prompts or any(len(p) < 2 for p in prompts):
            raise ValueError("every prompt needs at least 2 tokens")
        from models import left_pad

        self.model, self.temperature, self.top_p, self.share_prefix = model, temperature, top_p, share_prefix
        self.progress, self.sync = progress, sync
        self.static_cache = static_cache and sync is None
        self.graphed = False  # whether the last static decode ran as a CUDA graph
        self.cache_kw, self.keep_kw = cache_kwarg(model), keeps_last_logits(model)
        self.device = next(model.parameters()).device
        self.generator = generator if generator is not None else torch.Generator(self.device).manual_seed(seed)
        ids, mask = left_pad(prompts, pad_id)  # (P, W)
        self.ids, self.mask = ids.to(self.device), mask.to(self.device)
        # On the CPU the KV caches grow in place (``growing_cache``) and sampling runs the output head itself
        # (``_last_logits``); elsewhere (a GPU, FSDP) the model's own forward pass and transformers' cache.
        self.cpu = self.device.type == "cpu" and sync is None
        self.cpu_head = plain_head(model) if self.cpu else None
        self.prompt_tokens_run = 0  # prompt tokens the model processed: each prompt once when shared
        self.prefix = self._prefill(torch.arange(len(prompts), device=self.device)) if share_prefix else None

    @torch.no_grad()
    def _prefill(self, rows: torch.Tensor):
        """The KV cache of ``rows``' prompts without their last token."""
        cache = self._empty_cache()
        mask = self.mask[rows, :-1]
        self.model(input_ids=self.ids[rows, :-1], attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                   use_cache=True, **{self.cache_kw: cache}, **self.keep_kw)
        self.prompt_tokens_run += int(mask.sum())
        return cache

    def rows(self, indices: list[int], n: int) -> tuple[object, torch.Tensor]:
        """The KV cache and prompt index of ``n`` samples of each prompt in ``indices`` (prompt-major)."""
        rows = torch.tensor(indices, device=self.device).repeat_interleave(n)  # (R,) prompt of each sample
        return (cache_rows(self.prefix, rows, self._empty_cache()) if self.share_prefix else self._prefill(rows)), rows

    def _empty_cache(self):
        """A new KV cache: one that grows in place on the CPU (``growing_cache``), transformers' own elsewhere."""
        from transformers import DynamicCache

        return growing_cache() if self.cpu else DynamicCache()

    @torch.no_grad()
    def decode(self, cache, rows: torch.Tensor, choose: Choose) -> None:
        """Decode every row of ``rows`` (prompt indices, with their ``cache``) until ``choose`` ends it. Stops with
        ``stopping.Stopped`` on SIGTERM or SIGINT: the rows in flight are dropped, none is half-kept."""
        from models import eval_mode

        with eval_mode(self.model):
            alive = list(range(rows.shape[0]))  # sample of each batch row
            current = self.ids[rows, -1]  # (R,) the next token to feed: first the prompt's last one
            position = self.mask[rows].sum(-1) - 1  # (R,)
            attention = self.mask[rows]  # (R, W + generated so far)
            while True:
                stopping.check()
                if self.sync is not None and not self.sync(bool(alive)):
                    break  # every rank is done
                if not alive:
                    if self.sync is None:
                        break
                    self.model(input_ids=self.ids[:1, -1:])  # this rank is done; the others' forward passes need it
                    continue
                logits = self._last_logits(input_ids=current[:, None], attention_mask=attention,
                                           position_ids=position[:, None], use_cache=True, **{self.cache_kw: cache})
                chosen = self._draw(alive, logits, choose)
                keep = [b for b, token in enumerate(chosen) if token is not None]
                if not keep:
                    alive = []
                    continue
                if len(keep) < len(alive):  # finished rows leave the batch and the cache
                    index = torch.tensor(keep, dtype=torch.long, device=self.device)
                    cache.batch_select_indices(index)
                    attention, position = attention[index], position[index]
                    alive = [alive[b] for b in keep]
                current = torch.tensor([chosen[b] for b in keep], device=self.device)
                attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
                position = position + 1

    def _last_logits(self, **inputs) -> torch.Tensor:
        """The next-token logits (R, V) of the last position of ``inputs`` (the model's forward kwargs). On the CPU,
        with a plain output head, the decoder runs alone and the head as ``weight @ hidden.T``: for a few rows MKL
        computes that product twice as fast as ``linear``'s ``hidden @ weight.T`` (SmolLM2's 49k x 576 head for 32
        rows: 33 ms against 61 ms on 2 cores), the same numbers up to float rounding."""
        if self.cpu_head is None:
            return self.model(**inputs, **self.keep_kw).logits[:, -1]
        hidden = self.model.get_decoder()(**inputs).last_hidden_state[:, -1]  # (R, H)
        return (self.cpu_head.weight @ hidden.T).T.contiguous()

    def _draw(self, alive: list[int], logits: torch.Tensor, choose: Choose) -> list[int | None]:
        """One decoding step's choice for the live rows ``alive`` (their ``logits``, (R, V)): a token sampled per row,
        counted into the progress bar, then ``choose``'s verdict."""
        sampled = sample_tokens(logits, self.temperature, self.top_p, self.generator).tolist()
        if self.progress is not None:
            self.progress.update(len(alive))
        return choose(alive, sampled, logits)

    @torch.no_grad()
    def decode_static(self, cache, rows: torch.Tensor, choose: Choose, max_new_tokens: int) -> None:
        """``decode`` over a static KV cache of the prompt width plus ``max_new_tokens`` (``choose`` must end every row
        by then), replayed as a CUDA graph on a CUDA device (module docstring). Rows stay in the batch until all are
        done; ``choose`` sees only the live ones, as in ``decode``, so both draw the same random numbers."""
        from transformers import StaticCache

        from models import eval_mode

        with eval_mode(self.model):
            width, dtype = self.ids.shape[1], next(self.model.parameters()).dtype
            size = rows.shape[0]
            static = StaticCache(config=self.model.config, max_cache_len=width + max_new_tokens)
            for layer_index, layer in enumerate(cache.layers):  # the prompts' prefix: positions 0 .. width - 2
                static.update(layer.keys, layer.values, layer_index)
            del cache
            blocked = torch.finfo(dtype).min
            mask = torch.full((size, 1, 1, width + max_new_tokens), blocked, dtype=dtype, device=self.device)
            mask[:, 0, 0, :width - 1].masked_fill_(self.mask[rows, :-1].bool(), 0.0)  # padding stays blocked
            current = self.ids[rows, -1:].clone()  # (R, 1) the next token to feed: first the prompt's last one
            position = self.mask[rows].sum(-1, keepdim=True) - 1  # (R, 1)
            inputs = {"input_ids": current, "attention_mask": mask, "position_ids": position, "use_cache": True,
                      self.cache_kw: static}

            def step() -> torch.Tensor:
                return self._last_logits(**inputs)

            cuda = self.device.type == "cuda"
            graph, out = None, None
            side = torch.cuda.Stream(self.device) if cuda else None
            alive = list(range(size))  # sample of each live row; batch row b holds sample b
            self.graphed = False
            for t in range(max_new_tokens):
                stopping.check()
                mask[:, :, :, width - 1 + t] = 0.0  # this step's token is written at cache position width - 1 + t
                if graph is not None:
                    graph.replay()
                    logits = out
                elif cuda and t == self.warmup_steps:
                    graph, out = self._capture(step, side)
                    if graph is None:
                        cuda = False  # the capture failed: the static step runs eagerly from here on
                        logits = step()
                    else:
                        graph.replay()
                        logits = out
                elif cuda:  # the warm-up steps run on a side stream, as a capture needs (torch.cuda.graphs)
                    side.wait_stream(torch.cuda.current_stream(self.device))
                    with torch.cuda.stream(side):
                        logits = step()
                    torch.cuda.current_stream(self.device).wait_stream(side)
                else:
                    logits = step()
                live = logits if len(alive) == size else logits[torch.tensor(alive, device=self.device)]
                chosen = self._draw(alive, live, choose)
                keep = [(b, token) for b, token in zip(alive, chosen) if token is not None]
                if not keep:
                    break
                index = torch.tensor([b for b, _ in keep], device=self.device)
                current[index, 0] = torch.tensor([token for _, token in keep], device=self.device)
                position += 1
                alive = [b for b, _ in keep]
            else:
                raise RuntimeError(f"choose kept rows past max_new_tokens={max_new_tokens}")

    def _capture(self, step: Callable[[], torch.Tensor], side):
        """``step`` captured as a CUDA graph on stream ``side``, and its output tensor; (None, None), with a warning,
        when the capture fails (an operation that syncs with the host, for instance)."""
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=side):
                out = step()
        except Exception as error:  # noqa: BLE001 - any failure to capture falls back to eager steps
            warnings.warn(f"decoding runs without a CUDA graph: capturing the decoding step failed ({error})",
                          RuntimeWarning, stacklevel=3)
            torch.cuda.synchronize(self.device)
            return None, None
        self.graphed = True
        return graph, out

    def sample(self, indices: list[int], n: int, stop_ids: set[int], max_new_tokens: int) -> list[list[Continuation]]:
        """``n`` answers to each prompt in ``indices``, each ending at a stop token (kept) or after
        ``max_new_tokens`` tokens; per prompt, its n ``Continuation``s."""
        cache, rows = self.rows(indices, n)
        out = [Continuation() for _ in range(rows.shape[0])]

        def choose(alive: list[int], sampled: list[int], logits: torch.Tensor) -> list[int | None]:
            if self.temperature > 0:  # the entropy of the distribution each token was drawn from
                logp = torch.log_softmax(logits.float() / self.temperature, dim=-1)
                entropy = (-(logp.exp() * logp).sum(-1)).tolist()
            else:
                entropy = [0.0] * len(alive)
            chosen: list[int | None] = []
            for sample, token, h in zip(alive, sampled, entropy):
                answer = out[sample]
                answer.tokens.append(token)
                answer.entropy += h
                if token in stop_ids:
                    answer.finish = "stop"
                elif len(answer.tokens) >= max_new_tokens:
                    answer.finish = "length"
                chosen.append(None if answer.finish else token)
            return chosen

        if self.static_cache:
            self.decode_static(cache, rows, choose, max_new_tokens)
        else:
            self.decode(cache, rows, choose)
        return [out[i * n:(i + 1) * n] for i in range(len(indices))]


class GenerationMonitor:
    """A stopping criterion that ``generate`` calls after every token step (transformers' ``StoppingCriteria``
    protocol; not subclassed, so that importing this module does not import transformers' generation code): it adds
    the step's tokens (one per sequence still going) to ``progress`` and, once SIGTERM or SIGINT was received
    (``stopping.requested``), ends every sequence so that ``generate`` returns at once (``generate_from_prompts`` then
    raises ``stopping.Stopped``)."""

    def __init__(self, stop_ids: set[int], progress=None):
        self.stop_ids, self.progress = sorted(stop_ids), progress
        self.finished: torch.Tensor | None = None  # (B,) sequences that produced a stop token

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        last = input_ids[:, -1]  # (B,) the token this step produced
        if self.progress is not None:
            if self.finished is None:
                self.finished = torch.zeros_like(last, dtype=torch.bool)
                self.stop_ids = torch.tensor(self.stop_ids, device=last.device)
            self.progress.update(int((~self.finished).sum()))
            self.finished |= torch.isin(last, self.stop_ids)
        return torch.full_like(last, stopping.requested(), dtype=torch.bool)


# ---- generate_from_prompts: batched answers, through the sampler above on the CPU ------------------------------

#: Generation-config fields that change what is decoded beyond greedy, temperature, top-p and top-k, with the value
#: that changes nothing. Where a model's generation config (or a caller) sets another value, ``generate_from_prompts``
#: leaves decoding to transformers' ``generate``, which applies it.
NEUTRAL_GENERATION = {
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None, "min_length": 0, "min_new_tokens": 0, "suppress_tokens": None, "begin_suppress_tokens": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "exponential_decay_length_penalty": None,
    "sequence_bias": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "min_p": 0.0, "num_beams": 1,
    "renormalize_logits": False, "watermarking_config": None, "top_h": None, "penalty_alpha": None, "dola_layers": None,
    "prompt_lookup_num_tokens": None, "guidance_scale": 1.0,
}
#: What ``generate`` uses for a setting neither its caller nor the model's generation config gives (transformers fills
#: these in, e.g. a top-k cut at 50 whenever it samples).
GENERATE_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 50, "num_return_sequences": 1}


def sampler_settings(model, generate_kwargs: dict) -> tuple[float, float, int] | None:
    """(temperature, 0 for greedy; top-p; answers per prompt) with which ``PrefixSampler`` decodes what
    ``model.generate(**generate_kwargs)`` would (a setting not passed comes from the model's generation config, then
    from ``GENERATE_DEFAULTS``, as ``generate`` takes it), or None where ``generate`` would do something the sampler
    does not (a top-k cut, a repetition penalty, beams, any other keyword)."""
    from transformers import GenerationConfig

    if set(generate_kwargs) - set(GENERATE_DEFAULTS):
        return None
    config = getattr(model, "generation_config", None) or GenerationConfig()
    if any(getattr(config, name, None) not in (None, neutral) for name, neutral in NEUTRAL_GENERATION.items()):
        return None

    def setting(name: str):
        value = generate_kwargs.get(name, getattr(config, name, None))
        return GENERATE_DEFAULTS[name] if value is None else value

    if not setting("do_sample"):
        return 0.0, 1.0, setting("num_return_sequences")
    if setting("top_k") != 0:
        return None
    return setting("temperature"), setting("top_p"), setting("num_return_sequences")


def sharded(model) -> bool:
    """Whether ``model``'s forward passes are collectives across ranks (FSDP or DeepSpeed ZeRO-3 with several), where
    every rank must run as many as the others: ``generate`` then keeps finished ranks stepping (its ``synced_gpus``,
    decided the same way), which ``generate_from_prompts``'s sampler path does not."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    try:
        from transformers.distributed.fsdp import is_fsdp_managed_module
    except ImportError:  # transformers before 5
        from transformers.integrations.fsdp import is_fsdp_managed_module
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled() or is_fsdp_managed_module(model)


@torch.no_grad()
def generate_from_prompts(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, progress=None,
                          **generate_kwargs) -> list[str]:
    """Answers to prompt token ids (e.g. ``collate_functions.generation_prompt_ids``), in one batch, stopping at
    ``models.stop_token_ids``; ``generate_kwargs`` are ``generate``'s (sampling settings, ``num_return_sequences``:
    the answers to a prompt come out adjacent). ``progress`` (``models.token_bar``) counts the tokens as they come.
    Returns stripped answers in order; raises ``stopping.Stopped`` when a stop signal cut the generation short.

    On the CPU, where ``sampler_settings`` finds nothing the sampler lacks, the answers come from ``PrefixSampler``
    (each prompt run once whatever the number of answers, the KV cache grown in place, finished rows leaving the
    batch): on 2 cores 1.2x ``generate``'s speed for 16 greedy answers, 1.6x for 8 samples of each of 4 prompts and
    1.8x of 16 (``bench/generation.py``, docs/benchmarks.md). Greedy answers are ``generate``'s; sampled ones are
    drawn from the same distribution with another random stream, seeded from torch's global generator (so
    ``torch.manual_seed`` still fixes them).
    Elsewhere (a GPU, other settings, a one-token prompt, a model ``sharded`` across ranks),
    ``transformers_generate``."""
    from models import stop_token_ids

    on_cpu = next(model.parameters()).device.type == "cpu"
    settings = sampler_settings(model, generate_kwargs) if on_cpu and not sharded(model) else None
    if settings is None or min(map(len, prompts)) < 2:
        return transformers_generate(model, tokenizer, prompts, max_new_tokens, progress, **generate_kwargs)
    temperature, top_p, n = settings
    generator = torch.Generator().manual_seed(int(torch.randint(2**62, ()))) if temperature > 0 else None
    sampler = PrefixSampler(model, prompts, tokenizer.pad_token_id, temperature=temperature, top_p=top_p,
                            generator=generator, progress=progress)
    groups = sampler.sample(list(range(len(prompts))), n, stop_token_ids(tokenizer), max_new_tokens)
    return [text.strip() for text in tokenizer.batch_decode([c.tokens for g in groups for c in g], skip_special_tokens=True)]


@torch.no_grad()
def transformers_generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, progress=None,
                          **generate_kwargs) -> list[str]:
    """``generate_from_prompts`` through transformers' ``generate``, on one left-padded batch."""
    from transformers import StoppingCriteriaList

    from models import eval_mode, left_pad, stop_token_ids

    stop = stop_token_ids(tokenizer)
    ids, attention = left_pad(prompts, tokenizer.pad_token_id)  # (B, T): every answer starts at column T
    width = ids.shape[1]
    with eval_mode(model):
        generated = model.generate(
            input_ids=ids.to(model.device), attention_mask=attention.to(model.device), max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(stop),
            stopping_criteria=StoppingCriteriaList([GenerationMonitor(stop, progress)]), **generate_kwargs,
        )
    stopping.check()  # the answers of a generation cut short are not answers
    return [text.strip() for text in tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)]
