"""benchmark.py mfu, the GPU check: its FLOPs count (benchmark.train_flops) equals torch's FlopCounterMode on a
training step of tiny models, with the LM head applied to the loss tokens only, as the fused loss does."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import benchmark

CONFIGS = {  # Qwen2: q/k/v biases, tied head; Llama: untied, head_dim other than hidden / heads
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                             num_key_value_heads=2, vocab_size=300, num_hidden_layers=2,
                                             tie_word_embeddings=True)),
    "llama": (LlamaForCausalLM, LlamaConfig(hidden_size=48, intermediate_size=80, num_attention_heads=4, head_dim=16,
                                             num_key_value_heads=1, vocab_size=200, num_hidden_layers=3,
                                             tie_word_embeddings=False)),
}


@pytest.mark.parametrize("arch", sorted(CONFIGS))
@pytest.mark.parametrize("reference", [False, True])
def test_train_flops_equals_the_counted_matmuls(arch, reference):
    cls, config = CONFIGS[arch]
    config._attn_implementation = "eager"  # attention as matmuls, which FlopCounterMode counts (SDPA on CPU it does not)
    torch.manual_seed(0)
    model = cls(config)
    ids = torch.randint(0, config.vocab_size, (3, 20))
    prompt = 7  # the head scores positions 7.. only: 3 x 13 loss tokens
    with FlopCounterMode(display=False) as counter:
        if reference:  # a frozen model's forward over the same tokens (ASFT's anchor)
            with torch.no_grad():
                frozen = model.model(input_ids=ids).last_hidden_state
                frozen[:, prompt:] @ model.lm_head.weight.t()
        hidden = model.model(input_ids=ids).last_hidden_state
        (hidden[:, prompt:] @ model.lm_head.weight.t()).logsumexp(-1).sum().backward()
    want = benchmark.train_flops(config, tokens=60, loss_tokens=39, samples=3, reference=reference)
    assert counter.get_total_flops() == pytest.approx(want, rel=1e-12)
