"""Packed sequences without cross-document attention: per-token document ids -> the model
inputs that keep each document to itself, for each attention kernel.

The data loader packs documents into fixed-length rows (``train/data/stream.py``); a row
holds the tail of one document, whole documents, and the head of another. Causal attention
over the whole row lets a token attend to the earlier documents of its row: unrelated context
that the loss then depends on (and the packing order with it). With
``data.cross_document_attention: false`` (the default) each token attends only to earlier
tokens of its own document:

* ``sdpa``: a boolean block-diagonal causal mask ``(B, 1, T, T)`` (True = may attend), passed
  as ``attention_mask``. transformers returns a 4-D mask unchanged (``masking_utils``:
  "already prepared, or custom") and its sdpa integration hands it to
  ``scaled_dot_product_attention`` with ``is_causal=False``, so the mask is the whole truth.
  Memory: B * T * T bytes (4 MiB at B=4, T=1024), built on the device once per micro-batch.
* ``eager``: the same mask, additive (0 / a large negative float32): transformers' eager
  attention *adds* ``attention_mask`` to the scores, so a boolean mask would silently add 1s.
* ``flash_attention_2``: no mask at all; the variable-length kernel gets the cumulative
  document lengths over the flattened ``B * T`` tokens (``cu_seq_lens_q/k``, every row end is
  a boundary too) and the longest document (``max_length_q/k``), transformers'
  ``FlashAttentionKwargs``, which ``_flash_attention_forward`` uses before anything else.
  Why explicit and not transformers' detection from ``position_ids`` restarting at 0: that
  detection (``_is_packed_sequence``) only looks at batch size 1, so with a micro-batch of
  several rows it silently runs plain causal flash attention across documents; and it needs
  restarted position ids, which ``data.document_position_ids`` may leave off. Not run on a
  GPU yet (none here): tests/test_packing.py passes these inputs through transformers' Llama
  into a plain-torch kernel that keeps ``flash_attn_varlen_func``'s contract. On a GPU
  without flash-attn, ``auto`` resolves to sdpa, which then gets the mask (and cannot use its
  own flash kernel, which takes no mask).

Sliding-window models (Mistral with ``sliding_window`` set; Qwen2 with sliding layers): a 4-D
mask replaces transformers' own, window included, so the window is applied here too
(``q - k < window``, transformers' convention); for Qwen2's mix of full and sliding layers a
``{"full_attention": mask, "sliding_attention": windowed}`` mapping is passed, which its
model takes as prepared masks. flash-attn applies the window itself.

Padding (evaluation batches of unequal rows; training rows are full) is a document of its own
with id -1: no real token attends to it, and each padding position attends to itself only, so
no softmax row is empty (its output is discarded with its loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# Large negative, finite in float32 and in bfloat16 (an FSDP2 mixed-precision forward casts
# float inputs to bf16; float32's own minimum would round to -inf there).
_NEG = torch.finfo(torch.bfloat16).min

PADDING = -1
"""Document id of padding positions."""


def document_ids_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) position ids restarting at 0 at every document start (and at every row start)
    -> (B, T) int64 document index within the row: 0, 0, 1, 1, 1, 2, ..."""
    return (position_ids == 0).long().cumsum(-1) - 1


def block_causal_mask(
    document_ids: torch.Tensor, *, sliding_window: int | None = None
) -> torch.Tensor:
    """(B, T) document ids -> (B, 1, T, T) bool, True where query ``q`` may attend key ``k``:
    ``k <= q``, same document, not padding (padding attends to itself only); with
    ``sliding_window`` also ``q - k < sliding_window``."""
    t = document_ids.shape[-1]
    idx = torch.arange(t, device=document_ids.device)
    causal = idx[None, :] <= idx[:, None]  # (T, T): [q, k]
    if sliding_window is not None:
        causal = causal & (idx[:, None] - idx[None, :] < sliding_window)
    same = document_ids[:, :, None] == document_ids[:, None, :]  # (B, T, T)
    real = (document_ids != PADDING)[:, None, :]  # keys: (B, 1, T)
    mask = same & causal & real
    mask = mask | torch.eye(t, dtype=torch.bool, device=document_ids.device)  # no empty row
    return mask[:, None]


def additive(mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask as the float32 0 / -large mask eager attention adds to its scores."""
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(~mask, _NEG)


def varlen_kwargs(
    document_ids: torch.Tensor, device: torch.device | str | None = None
) -> dict[str, Any]:
    """(B, T) document ids (no padding) -> flash-attn varlen arguments over the flattened
    ``B * T`` tokens: ``cu_seq_lens_q/k`` (int32, (segments + 1,), starting at 0, on
    ``device``, default the ids' device) and ``max_length_q/k`` (int). A segment is a maximal
    run of one document within one row. Computed on the CPU: the loader's ids are there, and
    the int needs no device sync."""
    if bool((document_ids == PADDING).any()):
        raise ValueError("varlen_kwargs: padding is not supported; give full rows")
    b, t = document_ids.shape
    ids = document_ids.to("cpu")
    starts = torch.ones((b, t), dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]  # a row start is always a segment start
    flat_starts = torch.nonzero(starts.reshape(-1)).reshape(-1)  # (segments,)
    cu = torch.cat([flat_starts, torch.tensor([b * t])]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    cu = cu.to(document_ids.device if device is None else device)
    return {
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": longest,
        "max_length_k": longest,
    }


@dataclass(frozen=True)
class DocumentMasking:
    """How to keep packed documents apart for one model: its attention kernel and window."""

    implementation: str
    """transformers' ``_attn_implementation``: sdpa, eager or flash_attention_2."""
    sliding_window: int | None = None
    """Attention window (tokens) of the sliding layers, None when no layer slides."""
    mixed_layers: bool = False
    """Some layers full, some sliding (Qwen2 ``layer_types``): masks go as a mapping."""

    @classmethod
    def for_model(cls, config: Any) -> DocumentMasking:
        """From a transformers model config (``model.config``)."""
        impl = config._attn_implementation
        if impl not in ("sdpa", "eager", "flash_attention_2"):
            raise ValueError(
                f"data.cross_document_attention: false is implemented for sdpa, eager and "
                f"flash_attention_2, not {impl!r}; set model.attn_implementation to one of them"
            )
        window = getattr(config, "sliding_window", None)
        types = set(getattr(config, "layer_types", None) or [])
        if config.model_type == "mistral" or types == {"sliding_attention"}:
            return cls(impl, window)  # every layer slides (when a window is set)
        if "sliding_attention" in types and window is not None:
            return cls(impl, window, mixed_layers=len(types) > 1)
        return cls(impl)

    def inputs(self, document_ids: torch.Tensor, device: torch.device | str) -> dict[str, Any]:
        """Keyword arguments for the model's forward that keep the documents of
        ``document_ids`` ((B, T), this micro-batch) apart, built on ``device``."""
        if self.implementation == "flash_attention_2":
            return varlen_kwargs(document_ids, device)
        ids = document_ids.to(device)
        full = block_causal_mask(ids)
        window = self.sliding_window
        slide = full if window is None else block_causal_mask(ids, sliding_window=window)
        if self.implementation == "eager":
            full, slide = additive(full), additive(slide)
        if self.mixed_layers:
            return {"attention_mask": {"full_attention": full, "sliding_attention": slide}}
        return {"attention_mask": slide}
