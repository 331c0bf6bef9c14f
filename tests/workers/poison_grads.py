"""``launch/cpt.py`` with gradients made infinite in backward at chosen steps, the loss finite.

    POISON_STEPS=1,2 torchrun --standalone --nproc_per_node 2 tests/workers/poison_grads.py \
        --config C [k=v ...]

Builds the trainer exactly as the entry point does (``train.run.build_trainer``) on the real
backend, then hooks the model's final norm: at the listed steps (0-based, ``TrainState.step``
when the forward runs) its output passes through an identity whose backward multiplies the
incoming gradient by inf, so every gradient upstream of it becomes inf/NaN on every rank
while the forward, and so the loss, is unchanged. What an overflow in backward looks like.
"""

import os
import sys

import torch

from launch.cpt import parse_args
from train.config import load_config
from train.run import build_trainer


class InfGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by inf."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("inf")


def main() -> int:
    args = parse_args()
    cfg = load_config(args.config, args.overrides, world_size=int(os.environ["WORLD_SIZE"]))
    trainer = build_trainer(cfg)
    steps = {int(s) for s in os.environ["POISON_STEPS"].split(",")}
    norm = next(m for n, m in trainer.backend.module.named_modules() if n.endswith("model.norm"))

    def poison(module, inputs, output):
        return InfGrad.apply(output) if trainer.state.step in steps else output

    norm.register_forward_hook(poison)
    trainer.fit()
    trainer.backend.close()
    return 0 if trainer.exit_reason in ("finished", "signal") else 3


if __name__ == "__main__":
    sys.exit(main())
