"""Tiny random-init models of the common architectures, built inside the tests (nothing is shipped).

`make(arch, out_dir, seed)` saves a Hugging Face model directory with the embedded world's tokenizer and chat
template (vocabulary 2,044), so every script can train, evaluate and save it. Each config is sized for speed
(2 layers, width 64) and set so that the architecture's own quirk is visible at random-init logit scale:
Gemma 2/3 softcap at 2 (logits of std ~1.6), Cohere's logit_scale 0.25, Granite's logits_scaling 4, sliding
windows of 16 tokens (the world's samples are longer), MoE with 4 experts, top 2, router loss coefficient 0.01.
Dropout is off (GPT-2's default 0.1 would make a training step's loss differ from the eval-mode logits).
"""
import os
import shutil

import torch

WORLD_BASE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "world", "base")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
COMMON = dict(vocab_size=2044, bos_token_id=0, eos_token_id=[2, 0], pad_token_id=3, initializer_range=0.2,
              max_position_embeddings=512)
LLAMA_LIKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, **COMMON)

ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True, **LLAMA_LIKE)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True, **LLAMA_LIKE)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=False, **LLAMA_LIKE)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(**LLAMA_LIKE)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(final_logit_softcapping=2.0, sliding_window=16,
                                                         layer_types=["sliding_attention", "full_attention"], **LLAMA_LIKE)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(final_logit_softcapping=2.0, sliding_window=16,
                                                             layer_types=["sliding_attention", "full_attention"], **LLAMA_LIKE)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(**{k: v for k, v in LLAMA_LIKE.items() if k != "head_dim"})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=16, **LLAMA_LIKE)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=64, n_layer=2, n_head=4, n_positions=512, resid_pdrop=0.0,
                                                    embd_pdrop=0.0, attn_pdrop=0.0,
                                                    **{k: v for k, v in COMMON.items() if k != "max_position_embeddings"})),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(**LLAMA_LIKE)),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(logit_scale=0.25, **LLAMA_LIKE)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(logits_scaling=4.0, **LLAMA_LIKE)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                                                shared_expert_intermediate_size=64, decoder_sparse_step=1,
                                                                router_aux_loss_coef=0.01, **LLAMA_LIKE)),
}


def make(arch: str, out_dir, seed: int = 0) -> str:
    """Save a random-init `arch` model (HF format, safetensors) with the world's tokenizer; returns the directory."""
    import transformers
    transformers.utils.logging.disable_progress_bar()
    config_name, model_name, kwargs = ARCHS[arch]
    config = getattr(transformers, config_name)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).float()
    out_dir = str(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(WORLD_BASE, name), os.path.join(out_dir, name))
    shutil.copy(os.path.join(WORLD_BASE, "generation_config.json"), os.path.join(out_dir, "generation_config.json"))
    return out_dir
