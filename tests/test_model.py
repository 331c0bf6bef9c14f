"""The model builder gives transformers' own LlamaForCausalLM, from shape or from a directory."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from train.config import ModelConfig
from train.model import build_model, resolve_attn_implementation


def test_shapes_and_logits_match_transformers_llama():
    cfg = ModelConfig(vocab_size=320, hidden_size=64, intermediate_size=176, num_layers=2,
                      num_heads=4, num_kv_heads=2, max_position_embeddings=128)  # fmt: skip
    ours = build_model(cfg, seed=0)
    ref = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=320, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        )
    )  # fmt: skip
    ref_shapes = {k: v.shape for k, v in ref.state_dict().items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == ref_shapes
    ref.load_state_dict(ours.state_dict())
    ours.eval()
    ref.eval()
    x = torch.randint(0, 320, (2, 17))
    torch.testing.assert_close(ours(input_ids=x).logits, ref(input_ids=x).logits)


def test_init_from_local_hf_directory(tmp_path):
    src = build_model(ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                  num_layers=1, num_heads=2), seed=1)  # fmt: skip
    src.save_pretrained(tmp_path)
    loaded = build_model(ModelConfig(init_from=str(tmp_path)), seed=99)
    for (k, a), b in zip(src.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


def test_attention_auto_is_sdpa_without_gpu_flash_attn():
    if not torch.cuda.is_available():
        assert resolve_attn_implementation("auto") == "sdpa"
    assert resolve_attn_implementation("eager") == "eager"


def test_flops_per_token_hand_computed():
    from train.model import flops_per_token

    cfg = ModelConfig(vocab_size=100, hidden_size=8, intermediate_size=16, num_layers=1,
                      num_heads=2, tie_word_embeddings=False)  # fmt: skip
    model = build_model(cfg, seed=0)
    # Non-embedding parameters: q,k,v,o 4*8*8 + gate,up,down 3*8*16 + 2 norms 2*8 + final
    # norm 8 + lm_head 100*8.
    n = 4 * 64 + 3 * 128 + 16 + 8 + 800
    assert flops_per_token(model, seq_len=32) == 6 * n + 12 * 1 * 8 * 32


def test_model_from_directory_is_in_training_mode(tmp_path):
    """from_pretrained returns eval mode; MIGU collects only in training mode."""
    src = build_model(ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                  num_layers=1, num_heads=2), seed=1)  # fmt: skip
    src.save_pretrained(tmp_path)
    loaded = build_model(ModelConfig(init_from=str(tmp_path)), seed=0)
    assert all(m.training for m in loaded.modules())
