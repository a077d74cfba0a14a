"""Many processes on one model: FSDP2 sharding of distillation's teacher and student, and context
parallelism for sampling (`--cp N`).

A launch (`accelerate launch`, `torchrun`) sets up the processes and the default process group; the
recipe's `[parallel]` section picks what they share. With "fsdp" every transformer block is one
`fully_shard` unit and the root holds the rest (patch and text embeddings, time projection, head):
a block's weights are gathered for its forward (and again for its backward) and freed after it. Both the
frozen teacher and the student are sharded, so neither has to fit whole on one device.

torch's `fully_shard` is called here, not through accelerate's FSDP plugin: accelerate applies FSDP only
on CUDA launches (a CPU launch stays DDP), takes one model per `prepare` and wants its optimizer in the
same call, while distillation shards a teacher without an optimizer and the CPU tests must run the
code path the GPUs run.
"""

from __future__ import annotations

import os
import warnings

import torch

from .errors import SurgeryError


def is_sharded(recipe, accelerator) -> bool:
    """Whether this run shards its models: the recipe asks for FSDP and more than one process runs."""
    return recipe.parallel.strategy == "fsdp" and accelerator.num_processes > 1


def shard(model, accelerator, *, reshard_after_forward: bool = True, bf16: bool = False):
    """FSDP2 over every process: each `model.blocks[i]` one unit, the root the rest; in place, returns `model`.

    bf16: blocks compute in bf16 on gathered weights and reduce gradients in fp32; trainable parameters
    are kept in fp32 (the optimiser's master copy). The model may sit on the CPU: its shards move to
    `accelerator.device`, so the whole model never has to fit on one GPU.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    policy = MixedPrecisionPolicy()
    if bf16:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    # The transformer returns a view of its output (an unflatten); distillation never changes it in place, the
    # case this warning, printed on every forward, is about.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    for block in model.blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    # The root's own weights are used at both ends of the forward: keep them gathered between.
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=policy)
    return model


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The whole state dict of a sharded `model` on the main process (CPU tensors), empty on the others.
    A collective: every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def local(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor of a DTensor's whole value (a collective), or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def check_context_parallel(degree: int, heads: int) -> None:
    """Bad input before any work: `degree` must divide the heads (Ulysses gives each process H/N of them) and
    match the launch's process count."""
    if degree < 1 or heads % degree:
        raise SurgeryError(f"--cp {degree} does not divide the model's {heads} attention heads")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if degree > 1 and world != degree:
        raise SurgeryError(f"--cp {degree} runs on {degree} processes (torchrun --nproc_per_node {degree} or "
                           f"accelerate launch --num_processes {degree}); this launch has {world}")


def is_main_process() -> bool:
    """Whether this process writes a command's files: the only one, or rank 0 of a launch."""
    return int(os.environ.get("RANK", "0")) == 0


def context_parallel(model, degree: int):
    """Ulysses context parallelism over the launch's processes through diffusers' `enable_parallelism`: the
    sequence is split before the first block and gathered after the last; each attention exchanges tokens
    for heads (variants: `AttentionVariant._attend_head_group`). The video grid is recorded from the whole
    input before the split, so every process's variants see the true grid. Returns `model`; 1 changes nothing.
    Every process runs the same call with the same inputs and gets the same output."""
    check_context_parallel(degree, model.config.num_attention_heads)
    if degree == 1:
        return model
    from accelerate import PartialState
    from diffusers import ContextParallelConfig

    state = PartialState()  # the launch's process group, and this process's GPU where there are GPUs
    model.to(state.device)
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree))
    return model
