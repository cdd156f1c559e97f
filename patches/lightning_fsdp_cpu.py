"""Lightning's FSDP strategy on a CPU-only machine (FSDP over gloo), which Lightning 2.6 does not support.

Works around, for pytorch-lightning 2.5-2.6 with torch 2.13:
* Lightning refuses ``FSDPStrategy`` with ``accelerator="cpu"`` and hands torch's FSDP the GPU index as its device,
  which torch refuses without an accelerator ("FSDP needs a non-CPU accelerator device"). Passing
  ``device_id=torch.device("cpu")`` works: FSDP shards, gathers and reduce-scatters over gloo.
* Lightning gathers full state dicts with ``offload_to_cpu=True``; on CPU-resident FSDP that copies nothing and the
  clone afterwards reads freed memory (a segmentation fault in ``_full_post_state_dict_hook``). On CPU the gather
  runs without the offload.

We need it so the tests can check sharded training and checkpoints on CI's CPU machines; GPU runs do not take
either path. Delete it (and the ``cpu_capable`` call in distributed.py) once Lightning supports FSDP on CPU
(Lightning-AI/pytorch-lightning: "FSDP requires a GPU accelerator" check in accelerator_connector.py gone) and
torch's full state dict with offload_to_cpu no longer crashes on CPU.
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def _no_offload_full_state_dicts():
    import pytorch_lightning.strategies.fsdp as lightning_fsdp
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.api import FullOptimStateDictConfig

    def context(module, world_size: int, rank0_only: bool = True):
        return FSDP.state_dict_type(module=module, state_dict_type=StateDictType.FULL_STATE_DICT,
                                    state_dict_config=FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
                                    optim_state_dict_config=FullOptimStateDictConfig(offload_to_cpu=False,
                                                                                     rank0_only=rank0_only))

    original = lightning_fsdp._get_full_state_dict_context
    lightning_fsdp._get_full_state_dict_context = context
    try:
        yield
    finally:
        lightning_fsdp._get_full_state_dict_context = original


def cpu_capable(fsdp_class: type) -> type:
    """``fsdp_class`` (Lightning's ``FSDPStrategy`` or Ray's subclass of it), also working on CPU."""

    class CPUCapableFSDP(fsdp_class):
        def _on_cpu(self):
            return _no_offload_full_state_dicts() if self.root_device.type == "cpu" else contextlib.nullcontext()

        def _setup_model(self, model):
            import torch
            from torch.distributed.fsdp import FullyShardedDataParallel

            if self.root_device.type == "cpu" and not any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
                kwargs = dict(self.kwargs)
                self.kwargs.pop("auto_wrap_policy", None)  # applied here; Lightning would warn it is applied twice
                model = FullyShardedDataParallel(
                    module=model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
                    sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"), **kwargs)
            return super()._setup_model(model)

        def lightning_module_state_dict(self):
            with self._on_cpu():
                return super().lightning_module_state_dict()

        def optimizer_state(self, optimizer):
            with self._on_cpu():
                return super().optimizer_state(optimizer)

        def load_checkpoint(self, *args, **kwargs):
            with self._on_cpu():
                return super().load_checkpoint(*args, **kwargs)

    CPUCapableFSDP.__name__ = CPUCapableFSDP.__qualname__ = fsdp_class.__name__
    return CPUCapableFSDP
