"""Tiny random models of every supported family, saved as Hugging Face directories.

Each is transformers' own class and config, built here, not by ``train.model``: what
``model.init_from`` must load faithfully. Shapes follow tests/migu_common.py (hidden 48, 2
layers, intermediate 37 so that rows straddle ZeRO-3 partitions) with grouped-query attention.
What sets each family apart is switched on so that loading it as another family would change
the logits: Llama-3's rope scaling and tied embeddings, Mistral's sliding window (shorter than
the test sequences), Qwen2's q/k/v biases (random, not transformers' zeros).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 320  # >= tests.migu_common.VOCAB (the ids of its batches) and the BPE below
EOS = "<|endoftext|>"
SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=48,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8,
}
FAMILIES = {
    # name: (class, config)
    "llama2": (LlamaForCausalLM, LlamaConfig(**SHAPE, rms_norm_eps=1e-5)),
    "llama3": (
        LlamaForCausalLM,
        LlamaConfig(**SHAPE, tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE),
    ),
    "mistral": (MistralForCausalLM, MistralConfig(**SHAPE, sliding_window=8)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(**SHAPE, tie_word_embeddings=False)),
}


def make_family(name: str, out: Path, *, seed: int = 0) -> Path:
    """Save family ``name``'s tiny random model to ``out`` (Qwen2: with a BOS-less tokenizer)."""
    cls, config = FAMILIES[name]
    torch.manual_seed(seed)
    model = cls(config)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bias"):  # transformers initialises biases to 0
                p.normal_(0.0, 0.5)
    model.save_pretrained(out)
    if name == "qwen2":
        save_bosless_tokenizer(out)
    return out


def save_bosless_tokenizer(out: Path) -> None:
    """A byte-level BPE (vocabulary <= VOCAB, trained on demo text) whose tokenizer_config says
    what Qwen2's does: ``bos_token: null``, EOS ``<|endoftext|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [
        json.loads(line)["text"]
        for line in (ROOT / "data/demo/literature/heldout.jsonl").read_text().splitlines()
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    assert tok.get_vocab_size() <= VOCAB
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": None,
        "model_max_length": 32768,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
