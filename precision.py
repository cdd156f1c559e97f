"""FP8 training: which linear layers can run in FP8, and converting them with one of two backends.

* ``te``: NVIDIA Transformer Engine (``te.Linear`` under ``te.fp8_autocast`` with a ``DelayedScaling`` recipe),
  what ``--precision transformer-engine`` uses.
* ``torchao``: PyTorch's own float8 training (``torchao.float8``, dynamic tensorwise scaling, best under
  ``torch.compile``), a small pure-Python install used where Transformer Engine cannot be installed.

Both run FP8 matrix products only; norms, attention, softmax and the loss stay in the weights' dtype. FP8 GEMMs
need the inner and outer dimensions of each weight to be multiples of 16; a layer that is not is kept in high
precision and reported, never skipped silently. The output head is kept in high precision too: its logits feed
the loss directly, and in tied models it shares its weight with the input embeddings.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)

FP8_BACKENDS = ("te", "torchao")
FP8_FORMATS = ("HYBRID", "E4M3")  # HYBRID: E4M3 forward, E5M2 gradients (Transformer Engine's recommendation)
FP8_MULTIPLE = 16
# Transformer Engine's FP8 GEMM also needs the input's leading dimensions (batch x sequence) to multiply to a multiple
# of 8 (``transformer_engine.pytorch.utils.assert_dim_for_fp8_exec``): under it, batches pad their width to one.
FP8_TOKEN_MULTIPLE = 8


def sequence_multiple(precision: str) -> int:
    """What a padded batch's width must be a multiple of under ``--precision precision``: 8 under Transformer
    Engine's FP8 (then batch x width is too, whatever the batch size; the padding is masked out of every loss), else
    1."""
    return FP8_TOKEN_MULTIPLE if precision.startswith("transformer-engine") else 1


def sampling_autocast(precision: str, device: torch.device, static_cache: bool = False) -> contextlib.AbstractContextManager:
    """The autocast a policy samples its own rollouts under: under --precision bf16-mixed the training pass's (bf16
    matrix products, float32 weights), so the policy sampled is the policy trained, and a CPU with AVX-512 BF16
    decodes about 1.5x faster than in float32 (docs/benchmarks.md); none under the other precisions (bf16-true's
    weights are bf16 already), nor for decoding over a static KV cache (CUDA graphs), whose cache and mask are
    allocated in the weights' dtype."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed" and not static_cache)


@dataclass
class Fp8Plan:
    """Which ``nn.Linear`` layers (by qualified name) run in FP8, and why the others do not."""

    convert: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"FP8: {len(self.convert)} linear layers converted, {len(self.skipped)} kept in high precision"]
        lines += [f"  {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def fp8_plan(model: torch.nn.Module) -> Fp8Plan:
    """Every ``nn.Linear`` of ``model``: to convert, or kept with the reason (output head, dimensions)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    plan = Fp8Plan()
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if module is head:
            plan.skipped[name] = "output head (its logits feed the loss; kept in high precision)"
        elif module.in_features % FP8_MULTIPLE or module.out_features % FP8_MULTIPLE:
            plan.skipped[name] = (f"shape {module.out_features}x{module.in_features}: FP8 GEMMs need both dimensions "
                                  f"to be multiples of {FP8_MULTIPLE}")
        else:
            plan.convert.append(name)
    return plan


def import_te():
    """``transformer_engine.pytorch``, loading the cuDNN that PyTorch uses.

    Transformer Engine looks for cuDNN in $CUDNN_HOME / $CUDNN_PATH / the CUDA toolkit before the ``nvidia-cudnn``
    wheel that PyTorch loads, and its library resolves the cuDNN sub-libraries by name. On a machine with both
    (NVIDIA's images often have a system cuDNN), once PyTorch has loaded its ``libcudnn_graph`` the import then
    picks the system's ``libcudnn_cnn`` of another version and fails with an undefined symbol. Unless $CUDNN_HOME
    or $CUDNN_PATH says otherwise, every library of PyTorch's cuDNN wheel is loaded first, so the names resolve to
    those."""
    if not (os.environ.get("CUDNN_HOME") or os.environ.get("CUDNN_PATH")):
        try:
            import nvidia.cudnn

            libraries = sorted(Path(next(iter(nvidia.cudnn.__path__))).glob("lib/libcudnn*.so.*[0-9]"))
        except (ImportError, StopIteration):
            libraries = []
        for library in libraries:
            ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
        if libraries:
            os.environ["CUDNN_HOME"] = str(libraries[0].parent.parent)
    import transformer_engine.pytorch as te

    return te


def te_recipe(fp8_format: str = "HYBRID", amax_history_len: int = 16, margin: int = 0, scaling: str = "delayed"):
    """Transformer Engine's FP8 recipe.

    * ``delayed``: the scale of each tensor comes from the maximum of its last ``amax_history_len`` absolute maxima,
      with ``2**margin`` of headroom. No extra pass over the tensor, but the scale trails the tensor: on an H100 a
      small Llama learning a copy task trailed bf16 by up to one 25-step window while its loss collapsed (with a
      history of 1 too), and matched it before and after (docs/benchmarks.md).
    * ``current``: the scale comes from the tensor itself (one more reduction per cast); it tracked bf16 step for
      step in the same run. ``amax_history_len`` and ``margin`` do not apply."""
    import_te()
    from transformer_engine.common.recipe import DelayedScaling, Float8CurrentScaling, Format

    if scaling == "current":
        return Float8CurrentScaling(fp8_format=getattr(Format, fp8_format))
    if scaling != "delayed":
        raise ValueError(f"unknown FP8 scaling {scaling!r}; choose delayed or current")
    return DelayedScaling(fp8_format=getattr(Format, fp8_format), amax_history_len=amax_history_len,
                          amax_compute_algo="max", margin=margin)


def _replace(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def convert_to_fp8(model: torch.nn.Module, backend: str) -> Fp8Plan:
    """Swap the FP8-capable linear layers of ``model`` in place (weights kept); returns the plan, logged."""
    if backend not in FP8_BACKENDS:
        raise ValueError(f"unknown FP8 backend {backend!r}; choose one of {', '.join(FP8_BACKENDS)}")
    plan = fp8_plan(model)
    if backend == "torchao":
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        chosen = set(plan.convert)
        convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name("tensorwise"),
                                   module_filter_fn=lambda module, fqn: fqn in chosen)
    else:
        te = import_te()
        for name in plan.convert:
            old = model.get_submodule(name)
            new = te.Linear(old.in_features, old.out_features, bias=old.bias is not None,
                            params_dtype=old.weight.dtype, device=old.weight.device)
            with torch.no_grad():
                new.weight.copy_(old.weight)
                if old.bias is not None:
                    new.bias.copy_(old.bias)
            _replace(model, name, new)
    log.info("%s", plan.summary())
    return plan


def fp8_context(backend: str | None, recipe=None) -> contextlib.AbstractContextManager:
    """The context the forward pass runs in: ``te.autocast`` (``te.fp8_autocast`` before TE 2.8) for Transformer
    Engine, nothing otherwise (torchao's float8 layers scale and cast by themselves)."""
    if backend == "te":
        te = import_te()
        recipe = recipe if recipe is not None else te_recipe()
        if hasattr(te, "autocast"):  # Transformer Engine 2.8+ (fp8_autocast is deprecated there)
            return te.autocast(enabled=True, recipe=recipe)
        return te.fp8_autocast(enabled=True, fp8_recipe=recipe)
    return contextlib.nullcontext()


def lightning_plugin(cfg):
    """Lightning's Transformer Engine precision plugin for ``--precision transformer-engine[-float16]`` with the
    recipe of --fp8-recipe, --fp8-format, --fp8-amax-history-len and --fp8-margin, or None for Lightning's own
    precisions. The layers are converted beforehand by ``convert_to_fp8(model, "te")`` (which reports what stays in
    high precision), so the plugin does not replace layers itself."""
    if not cfg.precision.startswith("transformer-engine"):
        return None
    from pytorch_lightning.plugins.precision import TransformerEnginePrecision

    dtype = torch.bfloat16 if cfg.precision == "transformer-engine" else torch.float16
    return TransformerEnginePrecision(weights_dtype=dtype, replace_layers=False,
                                      recipe=te_recipe(cfg.fp8_format, cfg.fp8_amax_history_len, cfg.fp8_margin,
                                                      cfg.fp8_recipe))


def enable_activation_checkpointing(model: torch.nn.Module, fp8_backend: str | None = None) -> int:
    """Recompute every decoder layer's activations in the backward pass instead of keeping them (--activation-
    checkpointing), through the model's own checkpointing hooks (Hugging Face's ``GradientCheckpointingLayer``).

    The recompute must see the forward's numerics. With PyTorch's checkpoint (non-reentrant) it runs in the backward
    pass, outside any autocast the forward ran in; that is fine for bf16 weights, but under Transformer Engine the
    FP8 layers would then run outside ``te.autocast`` and fail. So with ``fp8_backend="te"`` each layer is
    checkpointed by Transformer Engine's ``te.checkpoint``, which records the FP8 state at the forward and re-enters
    it for the recompute (and keeps delayed scaling's amax history from counting the recompute twice).

    Returns:
        The number of layers checkpointed.
    """
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:  # transformers 5.x
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) and hasattr(m, "_gradient_checkpointing_func")]
    if fp8_backend == "te":
        te = import_te()
        for module in layers:
            module._gradient_checkpointing_func = te.checkpoint
    return len(layers)
