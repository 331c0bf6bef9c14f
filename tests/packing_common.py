"""Shared by the cross-document attention tests and their distributed worker: a fixed packed
batch and the independent reference, each document run through the model on its own."""

from __future__ import annotations

import torch

from train.packing import PADDING

SEQ = 24
PAD_TAIL = 4  # the last row ends in this many padding positions (labels -100)


def packed_batch(rows: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, document_ids, labels), each (rows, SEQ): row r packs a document A of 5 + r
    tokens, a document B of 9 tokens and a document C filling the rest; the last row's final
    PAD_TAIL positions are padding (document id -1, label -100)."""
    g = torch.Generator().manual_seed(123)
    ids = torch.randint(0, vocab, (rows, SEQ), generator=g)
    docs = torch.empty((rows, SEQ), dtype=torch.long)
    for r in range(rows):
        a = 5 + r
        docs[r, :a] = 0
        docs[r, a : a + 9] = 1
        docs[r, a + 9 :] = 2
    docs[-1, SEQ - PAD_TAIL :] = PADDING
    labels = ids.clone()
    labels[docs == PADDING] = -100
    return ids, docs, labels


def perturb_first_document(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """``ids`` with the token at position 1 (inside document A of every row) changed."""
    out = ids.clone()
    out[:, 1] = (out[:, 1] + 1) % vocab
    return out


def first_document_end(row: int) -> int:
    """Where document A of ``row`` ends (document B starts)."""
    return 5 + row


def per_document_logits(model: torch.nn.Module, ids: torch.Tensor, docs: torch.Tensor):
    """(T, V) logits of one packed row, each document run through ``model`` alone (positions
    from 0, the model's own causal mask); padding positions are NaN."""
    out = None
    for d in docs.unique().tolist():
        if d == PADDING:
            continue
        where = (docs == d).nonzero().reshape(-1)
        with torch.no_grad():
            logits = model(input_ids=ids[where][None]).logits[0]  # (len, V)
        if out is None:
            out = torch.full((ids.shape[0], logits.shape[-1]), float("nan"))
        out[where] = logits.float()
    assert out is not None
    return out
