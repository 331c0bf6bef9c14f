"""Packed rows without cross-document attention on a real backend (``engine.backend``:
DeepSpeed ZeRO-3 or FSDP2), 2 ranks: :func:`main` runs on every rank under
``tests/conftest.py::run_distributed`` (``tests/test_packing.py``).

Each rank takes its rows of tests/packing_common.packed_batch and
1. forwards them (no grad) with and without the document mask, as given and with a token of
   document A changed (tests/packing_common.perturb_first_document);
2. makes one MIGU training forward/backward with the mask, padding excluded from MIGU's
   statistics (MIGU reads them from the forward's labels), and derives the masks.

Returns its rows, the four logits tensors, its local MIGU statistics per layer, the loss; rank 0
also the masks, the layer names and the initial full weights.
"""

import torch

from migu_dist import build_backend
from migu_dist.migu import Migu
from tests.migu_common import tiny_config
from tests.packing_common import SEQ, packed_batch, perturb_first_document
from train.packing import DocumentMasking
from train.run import build_model_for


def main(args: list[str]) -> dict:
    cfg = tiny_config([f"train.seq_len={SEQ}", "train.grad_accum=1", *args])
    backend = build_backend(cfg.backend_config())
    r, w = backend.rank, backend.world_size
    model = build_model_for(cfg, backend)
    migu = Migu(cfg.migu, model, seed=cfg.train.seed)
    masking = DocumentMasking.for_model(model.config)
    backend.setup(model, lambda step: 1.0)
    init = backend.full_state_dict()

    mbs = cfg.train.micro_batch_size
    ids, docs, labels = packed_batch(w * mbs, cfg.model.vocab_size)
    rows = slice(r * mbs, (r + 1) * mbs)
    x, d, y = ids[rows], docs[rows], labels[rows]
    x2 = perturb_first_document(x, cfg.model.vocab_size)
    logits = {}
    with torch.no_grad():  # MIGU collects nothing without grad
        for mask in (True, False):
            extra = masking.inputs(d, backend.device) if mask else {}
            for name, inp in (("base", x), ("perturbed", x2)):
                y_hat = backend.module(input_ids=inp, **extra).logits
                logits[(mask, name)] = y_hat.float().cpu()

    batch = {"input_ids": x, "labels": y, **masking.inputs(d, backend.device)}
    loss = float(backend.forward_backward(batch))
    stats = [layer.stat.detach().cpu().clone() for layer in migu.layers]
    masks = [m.cpu() for m in migu.compute_masks(0)]
    result = {"rows": (rows.start, rows.stop), "logits": logits, "stats": stats, "loss": loss}
    if r == 0:
        result.update(masks=masks, layers=[x.name for x in migu.layers], init=init)
    return result
