"""The stand-ins of a CPU rehearsal (`REHEARSAL=1 bash benchmark/<method>.sh`, see benchmark/README.md): tiny local
copies of what the paper-scale scripts would download from the Hugging Face hub, in the same schemas, so that every
command of a recipe runs end to end in minutes on a laptop. Called by benchmark/common.sh, never needed by hand:

    python benchmark/rehearsal.py model Qwen/Qwen2.5-0.5B-Instruct runs/rehearsal/hub/Qwen/Qwen2.5-0.5B-Instruct
    python benchmark/rehearsal.py data runs/rehearsal/hub      # <hub>/<dataset id>/<config>/<split>.jsonl

A model is a randomly initialised 2-layer Qwen2 (hidden 64, grouped-query attention with q/k/v biases, tied
embeddings, like Qwen2.5-0.5B/1.5B) with the embedded world's tokenizer and chat template (world/base); its seed is
derived from the hub id, so the stand-ins of different models (the FAIT teacher, DRIFT's theta_R) differ but share
every tensor name and shape. The data are a few generated rows each of GSM8K (question / answer ending '#### n'),
MBPP (text / code / test_list: the gold code passes its asserts), SQuAD v1.1 (context / question /
answers{text, answer_start}) and TriviaQA rc.nocontext (question / answer{value, aliases, ...}).
"""
import json
import os
import shutil
import sys
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD_BASE = os.path.join(ROOT, "world", "base")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def make_model(hub_id: str, out: str):
    """A tiny random Qwen2 standing in for `hub_id` (seeded by the id), saved as a Hugging Face directory."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, Qwen2Config
    transformers.utils.logging.disable_progress_bar()
    with open(os.path.join(WORLD_BASE, "config.json")) as f:
        world = json.load(f)
    config = Qwen2Config(vocab_size=world["vocab_size"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=world["bos_token_id"],
                         eos_token_id=world["eos_token_id"], pad_token_id=world["pad_token_id"])
    torch.manual_seed(zlib.crc32(hub_id.encode()))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(WORLD_BASE, name), tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"rehearsal: {out} stands in for {hub_id} ({sum(p.numel() for p in model.parameters()):,} parameters, "
          f"random init)", file=sys.stderr)


def gsm8k(n: int, offset: int) -> list:
    names = ["Tom", "Ana", "Li", "Sam", "Mia", "Raj", "Eva", "Ben"]
    rows = []
    for i in range(offset, offset + n):
        a, b = 3 + i, 2 + 2 * i
        name = names[i % len(names)]
        rows.append({"question": f"{name} has {a} apples and buys {b} more. How many apples does {name} have now?",
                     "answer": f"{name} has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"})
    return rows


def mbpp(n: int, offset: int) -> list:
    rows = []
    for i in range(offset, offset + n):
        k = i + 2
        rows.append({"task_id": 600 + i, "text": f"Write a function to multiply a number by {k} and add {i}.",
                     "code": f"def f_{i}(x):\n    return x * {k} + {i}",
                     "test_list": [f"assert f_{i}({x}) == {x * k + i}" for x in (1, 2, 5)],
                     "test_setup_code": "", "challenge_test_list": []})
    return rows


def squad(n: int) -> list:
    places = ["Paris", "Lima", "Oslo", "Cairo", "Quito", "Hanoi", "Dakar", "Perth"]
    rows = []
    for i in range(n):
        place = places[i % len(places)]
        context = f"The museum opened in {1900 + i}. It stands in {place}, near the river."
        rows.append({"id": f"rehearsal{i}", "title": "Museum", "context": context,
                     "question": "In which city does the museum stand?",
                     "answers": {"text": [place, place], "answer_start": [context.index(place)] * 2}})
    return rows


def trivia_qa(n: int) -> list:
    facts = [("Which planet is known as the red planet?", "Mars", ["Mars", "Planet Mars"]),
             ("What is the largest ocean on Earth?", "Pacific Ocean", ["Pacific", "Pacific Ocean"]),
             ("Who wrote Hamlet?", "William Shakespeare", ["Shakespeare", "William Shakespeare"]),
             ("What is the chemical symbol of gold?", "Au", ["Au"])]
    rows = []
    for i in range(n):
        question, value, aliases = facts[i % len(facts)]
        rows.append({"question": question, "question_id": f"rehearsal{i}", "question_source": "rehearsal",
                     "answer": {"value": value, "aliases": aliases, "normalized_value": value.lower(),
                                "normalized_aliases": [a.lower() for a in aliases], "type": "WikipediaEntity"}})
    return rows


def make_data(hub: str):
    """<hub>/<dataset id>/<config>/<split>.jsonl (without a config: <hub>/<id>/<split>.jsonl), every set read."""
    sets = {("openai/gsm8k", "main", "train"): gsm8k(12, 0), ("openai/gsm8k", "main", "test"): gsm8k(4, 100),
            ("google-research-datasets/mbpp", "full", "train"): mbpp(8, 0),
            ("google-research-datasets/mbpp", "full", "test"): mbpp(4, 100),
            ("rajpurkar/squad", "", "validation"): squad(6),
            ("mandarjoshi/trivia_qa", "rc.nocontext", "validation"): trivia_qa(6)}
    for (name, config, split), rows in sets.items():
        path = os.path.join(hub, name, config, split + ".jsonl")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        print(f"rehearsal: {path} stands in for {name}{':' + config if config else ''} {split} ({len(rows)} rows)",
              file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "model":
        make_model(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 3 and sys.argv[1] == "data":
        make_data(sys.argv[2])
    else:
        raise SystemExit("usage: rehearsal.py model <hub id> <dir> | rehearsal.py data <hub dir>")
