"""The embedded world: small generated tasks, a tokenizer and a tiny Llama, so every script runs offline.

    python world.py            # rebuild world/ from its seed (seconds)

STAND-IN (issue 2): word problems with one or two +/- steps in GSM8K's schema (target task), a
string-reversal task in prompt/response schema (held-out, never trained on), a byte-level BPE tokenizer
with a ChatML template, and a randomly initialised LlamaForCausalLM. The full world (code and reading
tasks, sandboxed judges, a pretrained base model, OOD splits) replaces this in the "world" issue.
"""
import argparse
import json
import os
import random

NAMES = ["Ana", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "June", "Kai", "Lea"]
OBJECTS = ["apples", "books", "coins", "pens", "shells", "stamps", "marbles", "cards"]
WORDS = ["river", "stone", "cloud", "maple", "tiger", "lemon", "piano", "orbit", "candle", "garden", "pepper",
         "silver", "window", "rocket", "forest", "island", "castle", "violet", "copper", "meadow"]


def math_problem(rng: random.Random) -> dict:
    name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    total = rng.randint(2, 20)
    question, steps = f"{name} has {total} {obj}.", []
    for _ in range(rng.randint(1, 2)):
        if rng.random() < 0.5 or total < 2:
            k = rng.randint(1, 10)
            question += f" {name} gets {k} more."
            steps.append(f"{total} + {k} = {total + k}")
            total += k
        else:
            k = rng.randint(1, total - 1)
            question += f" {name} gives away {k}."
            steps.append(f"{total} - {k} = {total - k}")
            total -= k
    question += f" How many {obj} does {name} have now?"
    return {"question": question, "answer": "\n".join(steps) + f"\n#### {total}"}


def reverse_problem(rng: random.Random) -> dict:
    word = rng.choice(WORDS)
    return {"prompt": f"Spell the word backwards: {word}", "response": word[::-1], "task": "exact"}


def write_jsonl(path: str, rows: list):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]


def build_tokenizer(corpus: list, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>",
                                   bos_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build(out: str, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    rng = random.Random(seed)
    data = {"math": math_problem, "reverse": reverse_problem}
    sizes = {"train": 3000, "validation": 200, "test": 200}
    corpus = []
    for task, make in data.items():
        for split, n in sizes.items():
            rows = [make(rng) for _ in range(n)]
            write_jsonl(os.path.join(out, "data", task, f"{split}.jsonl"), rows)
            corpus += [" ".join(str(v) for v in r.values()) for r in rows]
    tokenizer = build_tokenizer(corpus, vocab_size=512)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(os.path.join(out, "base"), safe_serialization=True)
    tokenizer.save_pretrained(os.path.join(out, "base"))
    print(f"world written to {out}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"vocabulary {len(tokenizer)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "world"))
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args()
    build(a.out, a.seed)
