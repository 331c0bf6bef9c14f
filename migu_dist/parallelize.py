"""Activation checkpointing and ``torch.compile`` of a built model, in one documented order.

Called by the assembly between building the model and handing it to the backend, like
torchtitan's ``parallelize_llama`` (TP -> activation checkpointing -> compile -> FSDP), minus
tensor parallelism:

1. activation checkpointing, non-reentrant: the recompute runs inside autograd's backward,
   which is how MIGU's statistics hooks tell a recompute from a real forward;
2. ``torch.compile`` of each decoder block's ``forward``; with checkpointing on, the
   checkpoint wraps the compiled forward (outside it), not transformers' checkpoint inside it;
3. sharding: ``backend.setup`` (FSDP2's ``fully_shard`` per block, DeepSpeed's ZeRO), whose
   module hooks stay outside the compiled code.

MIGU's forward hooks may be registered before or after steps 1-2 (compilation is lazy, at the
first forward); they are traced into the compiled blocks.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager as ContextManager
from typing import Any

import torch
from torch import nn

# True while a block compiled by ``compile_blocks`` is recomputed for backward. Forward hooks
# (MIGU's statistics) read it: inside compiled code autograd's graph-task id is not visible,
# and dynamo guards on this flag instead (one extra compiled variant for the recompute).
RECOMPUTING = False


def parallelize(model: nn.Module, *, activation_checkpointing: bool, compile: bool) -> None:
    """Apply ``model.activation_checkpointing`` and ``model.compile`` to ``model`` (a
    transformers causal LM with ``model.model.layers``) in place, in the order above."""
    if compile:
        compile_blocks(model, checkpoint=activation_checkpointing)
    elif activation_checkpointing:
        hf: Any = model  # a transformers PreTrainedModel; its checkpointing, non-reentrant
        if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5
            hf.activation_checkpointing_enable({"use_reentrant": False})
        else:
            hf.gradient_checkpointing_enable({"use_reentrant": False})


@contextlib.contextmanager
def _recomputing() -> Iterator[None]:
    global RECOMPUTING
    RECOMPUTING = True
    try:
        yield
    finally:
        RECOMPUTING = False


def _recompute_context() -> tuple[ContextManager, ContextManager]:
    return contextlib.nullcontext(), _recomputing()


def _checkpointed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return torch.utils.checkpoint.checkpoint(
        fn, *args, use_reentrant=False, context_fn=_recompute_context, **kwargs
    )


def compile_blocks(model: nn.Module, *, checkpoint: bool) -> None:
    """``torch.compile`` every decoder block's ``forward`` (not ``__call__``): module-level hooks,
    such as FSDP2's all-gather, stay outside the compiled code, and the state-dict keys are
    unchanged. The hooks of the linears inside a block (MIGU's) are traced into its graph.

    With ``checkpoint``, the compiled forward is wrapped in non-reentrant activation
    checkpointing here instead of transformers' (which would checkpoint inside the compiled
    region, where dynamo cannot trace the hooks' side effects and falls back to eager).
    """
    for block in model.model.layers:  # type: ignore[union-attr]  # a transformers causal LM
        block.gradient_checkpointing = False  # ours, below, replaces transformers'
        compiled = torch.compile(block.forward)
        block.forward = functools.partial(_checkpointed, compiled) if checkpoint else compiled
