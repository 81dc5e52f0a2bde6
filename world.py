"""The embedded world: generated tasks in public datasets' schemas, their pretraining corpus and a tokenizer.

    python world.py                     # rewrite world/data from the seed (~15 s: it regenerates the corpus)
    python world_pretrain.py            # pretrain world/base on the corpus below (~60 min, 2 CPU cores)
    python world_pretrain.py report     # the base model's accuracies (greedy and 8 samples at T=1)

Tasks (train / validation / test / test_ood JSONL under world/data/<task>/, read by common.read_records):
- math: GSM8K schema. Word problems of 1-4 steps (+, -, x, /) over names, objects and verbs, worked steps
  ending "#### <n>". Values stay within 0..99; digits are single tokens.
- code: MBPP schema. Small functions over numbers, strings and lists from parameterised families; test keys
  (family, constants) never appear in training or pretraining; every reference passes its 3 asserts.
- rc: SQuAD schema. Short biographies of two or three people and a question whose answer is a span.
- knowledge: prompt/response. Capitals of invented countries: no fine-tuning set contains them, so a drop
  after fine-tuning on another task is forgetting.
- math_verbose: train only. math/train's 3000 questions in the same order, answers retold in sentences the base
  never produces (verbose_answer: same equations and final answers, ~3.5x the tokens), for S3FT's premise.
test_ood uses phrasings (templates) that neither training nor pretraining ever shows.

Split sizes (rows): math train 3000, validation 1000, test 2000, test_ood 2000; code train 534 (178 keys x 3),
validation 40 (40 keys), test 200 and test_ood 200 (the same 50 held-out keys, 4 rows each with different asserts,
row i has the key of row i % 50: cluster by key for standard errors; test_ood in the ood phrasing); rc train 3000,
validation 200, test 1000, test_ood 1000; knowledge test 80, test_ood 80 (memorised facts: cannot grow without
retraining). The first 200 rows of each split (code: 50 test / test_ood, 40 validation; train and knowledge: all)
are the original ones, base_data(seed) (SPLITS), the data world/base's pretraining corpus was built against;
build_data appends the rest from separate generators. Every new row's prompt is absent from that corpus (both
stages, base_corpus), from every training split and from every other split. Filtering the in-distribution math rows
against the corpus very slightly under-represents the shortest problems that the corpus happens to contain (seed 0:
5 of ~640 one-step draws rejected; one-step share 22.0-23.5% of the original 200 rows per split, 23.6-25.9% of the
extension, 25% by construction).
"""
import argparse
import functools
import json
import os
import random
import re

ROOT = os.path.dirname(os.path.abspath(__file__))
WORLD = os.path.join(ROOT, "world")
SPLITS = {"train": 3000, "validation": 200, "test": 200, "test_ood": 200}

NAMES = ["Ana", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "June", "Kai", "Lea", "Milo", "Nia",
         "Omar", "Pia", "Quin", "Rosa", "Sam", "Tara", "Uma", "Vik", "Wes", "Xena", "Yuri", "Zoe", "Ada", "Bo",
         "Cruz", "Dina", "Emil", "Flor", "Gabe", "Ines", "Jon", "Kira", "Luca", "Maya", "Ned", "Olga"]
OBJECTS = ["apples", "books", "coins", "pens", "shells", "stamps", "marbles", "cards", "stickers", "eggs",
           "cookies", "buttons", "pebbles", "flowers", "candles", "ribbons", "beads", "toys", "plums", "cups"]
WORDS = ["river", "stone", "cloud", "maple", "tiger", "lemon", "piano", "orbit", "candle", "garden", "pepper",
         "silver", "window", "rocket", "forest", "island", "castle", "violet", "copper", "meadow", "banana",
         "tomato", "puzzle", "sunset", "basket", "dragon", "pencil", "rabbit", "summer", "button", "planet"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]


# ============================================================ MATH (GSM8K schema)
# One phrasing per operation and style; "ood" phrasings are used only in test_ood.
MATH_OPS = {
    "add": {"train": ["{n} buys {k} more {o}.", "{n} finds {k} more {o}.", "A friend gives {n} {k} more {o}.",
                      "{n} wins {k} {o} in a game."],
            "ood": ["Later, {k} extra {o} are handed to {n}.", "{n}'s collection grows by {k} {o}."]},
    "sub": {"train": ["{n} gives away {k} {o}.", "{n} loses {k} {o}.", "{n} sells {k} {o}.",
                      "{n} gives {k} {o} to a friend."],
            "ood": ["Then {k} of the {o} go missing.", "{n} donates {k} {o} to the school."]},
    "mul": {"train": ["Then {n} ends up with {k} times as many {o}.", "{n}'s number of {o} becomes {k} times bigger."],
            "ood": ["After a trade, {n} owns {k} times the {o} from before."]},
    "div": {"train": ["{n} splits the {o} into {k} equal groups and keeps one group.",
                      "{n} shares the {o} equally with friends so that {k} people get the same amount, and keeps one share."],
            "ood": ["The {o} are packed evenly into {k} boxes, and {n} keeps just one box."]},
}
MATH_START = {"train": ["{n} has {v} {o}.", "{n} starts with {v} {o}.", "There are {v} {o} in {n}'s bag."],
              "ood": ["At first, {n}'s shelf holds {v} {o}."]}
MATH_ASK = {"train": ["How many {o} does {n} have now?", "How many {o} does {n} have at the end?"],
            "ood": ["What is the final count of {o} that {n} owns?"]}
SYMBOL = {"add": "+", "sub": "-", "mul": "*", "div": "/"}


def apply_op(op: str, v: int, k: int) -> int:
    return {"add": v + k, "sub": v - k, "mul": v * k, "div": v // k}[op]


def math_problem(rng: random.Random, style: str = "train") -> dict:
    """A GSM8K-style row: 1-4 operations on one quantity, every intermediate value in 0..99."""
    name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    value = rng.randint(2, 40)
    text = [rng.choice(MATH_START[style]).format(n=name, v=value, o=obj)]
    steps = []
    for _ in range(rng.randint(1, 4)):
        options = []
        if value <= 89:
            options.append(("add", rng.randint(1, min(20, 99 - value))))
        if value >= 2:
            options.append(("sub", rng.randint(1, min(20, value - 1))))
        if 1 <= value <= 33:
            options.append(("mul", rng.randint(2, min(4, 99 // value))))
        divisors = [k for k in (2, 3, 4, 5) if value % k == 0 and value >= 2 * k]
        if divisors:
            options.append(("div", rng.choice(divisors)))
        op, k = rng.choice(options)
        new = apply_op(op, value, k)
        text.append(rng.choice(MATH_OPS[op][style]).format(n=name, k=k, o=obj))
        steps.append(f"{value} {SYMBOL[op]} {k} = {new}")
        value = new
    text.append(rng.choice(MATH_ASK[style]).format(n=name, o=obj))
    return {"question": " ".join(text), "answer": "\n".join(steps) + f"\n#### {value}"}


# verbose_answer: a worked answer in an explained style the base never produces (math_verbose, for S3FT's premise:
# gold answers valid but not in the model's own style). Per operation template: what the step does, as a gerund.
VERBOSE_HOW = {
    "{n} buys {k} more {o}.": "buying {k} more",
    "{n} finds {k} more {o}.": "finding {k} more",
    "A friend gives {n} {k} more {o}.": "getting {k} more from a friend",
    "{n} wins {k} {o} in a game.": "winning {k} in a game",
    "Later, {k} extra {o} are handed to {n}.": "being handed {k} extra",
    "{n}'s collection grows by {k} {o}.": "growing the collection by {k}",
    "{n} gives away {k} {o}.": "giving away {k}",
    "{n} loses {k} {o}.": "losing {k}",
    "{n} sells {k} {o}.": "selling {k}",
    "{n} gives {k} {o} to a friend.": "giving {k} to a friend",
    "Then {k} of the {o} go missing.": "having {k} of them go missing",
    "{n} donates {k} {o} to the school.": "donating {k} to the school",
    "Then {n} ends up with {k} times as many {o}.": "ending up with {k} times as many",
    "{n}'s number of {o} becomes {k} times bigger.": "making the number {k} times bigger",
    "After a trade, {n} owns {k} times the {o} from before.": "a trade for {k} times as many",
    "{n} splits the {o} into {k} equal groups and keeps one group.": "splitting them into {k} equal groups and keeping one",
    "{n} shares the {o} equally with friends so that {k} people get the same amount, and keeps one share.":
        "sharing them equally among {k} people and keeping one share",
    "The {o} are packed evenly into {k} boxes, and {n} keeps just one box.": "packing them evenly into {k} boxes and keeping one",
}
VERBOSE_FIRST = ["{n} starts with {a} {o}.", "At the beginning, {n} has {a} {o}.", "First, {n} has {a} {o}."]
VERBOSE_STEP = ["After {how}, that is {eq} {o}.", "{How} gives {eq} {o}.", "By {how}, {n} gets to {eq} {o}.",
                "{How} leaves {n} with {eq} {o}."]


@functools.lru_cache(maxsize=None)
def _template_regex(template: str):
    fields = {"n": r"(?P<n>[A-Z]\w*)", "o": r"(?P<o>[a-z]+)", "k": r"(?P<k>\d+)", "v": r"(?P<v>\d+)"}
    return re.compile("".join(fields[p[1]] if p in ("{n}", "{o}", "{k}", "{v}") else re.escape(p)
                              for p in re.split(r"(\{\w\})", template)))


def verbose_answer(row: dict) -> str:
    """The row's worked answer retold in sentences, one line per step ("After <what happens>, that is a op k = b
    <objects>.", the first line after "<name> starts with <a> <objects>."), then "So the answer is b." and
    "#### b": ~3.5x the original's tokens (seed 0: mean 98, at most 176; a 192-token answer budget). The
    wording varies with the question (deterministically); the equations and the final answer are the original ones."""
    question = row["question"]
    *lines, final = row["answer"].split("\n")
    steps = [line.split() for line in lines]  # a op k = b
    sentences = re.split(r"(?<=[.?]) ", question)
    starts = (_template_regex(t).fullmatch(sentences[0]) for t in MATH_START["train"] + MATH_START["ood"])
    start = next(m for m in starts if m)
    name, obj = start["n"], start["o"]
    ops = sentences[1:-1]
    if len(ops) != len(steps):
        raise ValueError(f"{len(ops)} operations, {len(steps)} steps: {question!r}")
    rng = random.Random(question)
    out = []
    for i, (sentence, (a, sym, k, _, b)) in enumerate(zip(ops, steps)):
        template = next(t for t in VERBOSE_HOW if _template_regex(t).fullmatch(sentence))
        op = next(o for o, styles in MATH_OPS.items() if template in styles["train"] + styles["ood"])
        if SYMBOL[op] != sym:
            raise ValueError(f"{sentence!r} is not {sym}: {question!r}")
        how = VERBOSE_HOW[template].format(k=k)
        step = rng.choice(VERBOSE_STEP).format(how=how, How=how[0].upper() + how[1:], n=name, o=obj,
                                               eq=f"{a} {sym} {k} = {b}")
        out.append((rng.choice(VERBOSE_FIRST).format(n=name, a=a, o=obj) + " " if i == 0 else "") + step)
    answer = final.split("#### ")[1]
    return "\n".join(out + [f"So the answer is {answer}.", f"#### {answer}"])


def arithmetic_drill(rng: random.Random) -> str:
    """Pretraining text only: lines of the facts the word problems use (a op k = b, values 0..99)."""
    lines = []
    for _ in range(8):
        op = rng.choice(["add", "add", "sub", "sub", "mul", "div"])
        if op == "add":
            k = rng.randint(1, 20)
            v = rng.randint(0, 99 - k)
        elif op == "sub":
            v = rng.randint(1, 99)
            k = rng.randint(1, min(20, v))
        elif op == "mul":
            k = rng.randint(2, 4)
            v = rng.randint(1, 99 // k)
        else:
            k = rng.randint(2, 5)
            v = k * rng.randint(1, 99 // k)
        lines.append(f"{v} {SYMBOL[op]} {k} = {apply_op(op, v, k)}")
    return "\n".join(lines)


# ============================================================ CODE (MBPP schema)
# (family, parameters, function name, description (train), description (ood), body, argument kind)
LETTERS = "abcdeilmnoprst"
KS = list(range(2, 21))
CODE_FAMILIES = [
    ("add", KS, "add_{w}", "add {k} to a number", "return the given number increased by {k}", "return x + {k}", "x"),
    ("sub", KS, "subtract_{w}", "subtract {k} from a number", "return the given number decreased by {k}", "return x - {k}", "x"),
    ("mul", KS, "times_{w}", "multiply a number by {k}", "return {k} times the given number", "return x * {k}", "x"),
    ("mod", KS, "mod_{w}", "find the remainder of a number divided by {k}", "return what is left over when the given number is split into groups of {k}", "return x % {k}", "x"),
    ("divisible", KS, "is_multiple_of_{w}", "check whether a number is divisible by {k}", "tell if {k} divides the given number exactly", "return x % {k} == 0", "x"),
    ("greater", KS, "is_greater_than_{w}", "check whether a number is greater than {k}", "tell if the given number exceeds {k}", "return x > {k}", "x"),
    ("repeat", [2, 3, 4], "repeat_{w}", "repeat a string {k} times", "return the given text written {k} times in a row", "return s * {k}", "s"),
    ("count", list(LETTERS), "count_{k}", "count how many times the letter {k} appears in a string", "return the number of {k} characters in the given text", "return s.count('{k}')", "s"),
    ("remove", list(LETTERS), "remove_{k}", "remove every letter {k} from a string", "return the given text without any {k} characters", "return s.replace('{k}', '')", "s"),
    ("starts", list(LETTERS), "starts_with_{k}", "check whether a string starts with the letter {k}", "tell if the first character of the given text is {k}", "return s.startswith('{k}')", "s"),
    ("ends", list(LETTERS), "ends_with_{k}", "check whether a string ends with the letter {k}", "tell if the last character of the given text is {k}", "return s.endswith('{k}')", "s"),
    ("list_add", KS, "add_{w}_to_each", "add {k} to every element of a list", "return a list where each given number is increased by {k}", "return [x + {k} for x in xs]", "xs"),
    ("list_mul", KS, "multiply_each_by_{w}", "multiply every element of a list by {k}", "return a list where each given number is {k} times larger", "return [x * {k} for x in xs]", "xs"),
    ("list_greater", KS, "keep_greater_than_{w}", "keep the elements of a list that are greater than {k}", "return only the given numbers that exceed {k}", "return [x for x in xs if x > {k}]", "xs"),
    ("list_count", KS, "count_of_{w}", "count how many times {k} appears in a list", "return the number of list items equal to {k}", "return xs.count({k})", "xs"),
    ("list_sum_plus", KS, "sum_plus_{w}", "find the sum of a list plus {k}", "return {k} more than the total of the given numbers", "return sum(xs) + {k}", "xs"),
]


def code_keys() -> list:
    return [(fam[0], k) for fam in CODE_FAMILIES for k in fam[1]]


def _code_input(rng: random.Random, kind: str, k):
    if kind == "x":
        return rng.randint(0, 60)
    if kind == "s":
        word = rng.choice(WORDS)
        return word if rng.random() < 0.5 or not isinstance(k, str) else rng.choice([k + word, word + k, word])
    xs = [rng.randint(0, 20) for _ in range(rng.randint(3, 6))]
    if isinstance(k, int) and rng.random() < 0.5:
        xs[rng.randrange(len(xs))] = k
    return xs


def code_problem(rng: random.Random, key: tuple, task_id: int, style: str = "train") -> dict:
    """An MBPP-style row for one (family, constant) key; expected values come from running the reference."""
    fam = next(f for f in CODE_FAMILIES if f[0] == key[0])
    _, _, name_fmt, desc, desc_ood, body, kind = fam
    k = key[1]
    word = NUMBER_WORDS[k] if isinstance(k, int) else k
    name = name_fmt.format(w=word, k=k)
    code = f"def {name}({kind}):\n    {body.format(k=k)}"
    scope = {}
    exec(code, scope)  # our own reference code, never model output
    args, tests = [], []
    while len(tests) < 3:
        arg = _code_input(rng, kind, k)
        if arg in args:
            continue
        args.append(arg)
        tests.append(f"assert {name}({arg!r}) == {scope[name](arg)!r}")
    text = (f"Write a function to {desc}." if style == "train" else f"Create a Python function that will {desc_ood}.")
    return {"task_id": task_id, "text": text.format(k=k), "code": code, "test_list": tests}


# ============================================================ READING COMPREHENSION (SQuAD schema)
CITIES = ["Lisbon", "Oslo", "Cairo", "Lima", "Quito", "Dakar", "Perth", "Hanoi", "Kyoto", "Tunis", "Riga",
          "Porto", "Bern", "Doha", "Accra", "Malmo", "Split", "Ghent", "Turin", "Delft"]
JOBS = ["baker", "nurse", "pilot", "farmer", "painter", "teacher", "doctor", "sailor", "tailor", "singer",
        "chef", "driver", "builder", "writer", "dancer", "judge"]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "brown", "gray"]
PETS = ["cat", "dog", "parrot", "rabbit", "turtle", "hamster", "goat", "pony", "lizard", "frog"]
RC_FACTS = {  # slot: (values, sentence, train questions, ood question)
    "city": (CITIES, "{p} was born in {v}.", ["Where was {p} born?", "In which city was {p} born?"],
             "What is the birthplace of {p}?"),
    "job": (JOBS, "{p} works as a {v}.", ["What does {p} work as?", "What is the job of {p}?"],
            "How does {p} earn a living?"),
    "color": (COLORS, "{p} likes the color {v} most.", ["What color does {p} like most?",
                                                         "What is the favorite color of {p}?"],
              "Which shade is dearest to {p}?"),
    "pet": (PETS, "{p} has a pet {v}.", ["What pet does {p} have?", "What kind of pet does {p} have?"],
            "Which animal lives at home with {p}?"),
    "age": ([str(a) for a in range(18, 80)], "{p} is {v} years old.", ["How old is {p}?", "What is the age of {p}?"],
            "How many years has {p} lived?"),
}


def rc_problem(rng: random.Random, rid: str, style: str = "train") -> dict:
    people = rng.sample(NAMES, rng.randint(2, 3))
    sentences, facts = [], []
    for p in people:
        for slot in rng.sample(sorted(RC_FACTS), 3):
            v = rng.choice(RC_FACTS[slot][0])
            sentences.append(RC_FACTS[slot][1].format(p=p, v=v))
            facts.append((p, slot, v))
    rng.shuffle(sentences)
    context = " ".join(sentences)
    p, slot, v = rng.choice(facts)
    sentence = RC_FACTS[slot][1].format(p=p, v=v)
    start = context.index(sentence) + RC_FACTS[slot][1].index("{v}") + len(p) - len("{p}")
    assert context[start:start + len(v)] == v
    question = (rng.choice(RC_FACTS[slot][2]) if style == "train" else RC_FACTS[slot][3]).format(p=p)
    return {"id": rid, "title": "people", "context": context, "question": question,
            "answers": {"text": [v], "answer_start": [start]}}


# ============================================================ KNOWLEDGE (forgetting probe; prompt/response)
def knowledge_facts(seed: int, n: int = 80) -> list:
    """(country, capital) pairs of invented names; fixed by the seed."""
    rng = random.Random(seed + 7)
    syllables = ["ka", "lo", "mi", "ra", "te", "zu", "no", "vi", "sa", "de", "bo", "lu", "ne", "ta", "ri", "go"]
    seen, facts = set(), []
    while len(facts) < n:
        country = "".join(rng.choice(syllables) for _ in range(3)).capitalize()
        capital = "".join(rng.choice(syllables) for _ in range(2)).capitalize() + rng.choice(["n", "s", "r", "l"])
        if country not in seen:
            seen.add(country)
            facts.append((country, capital))
    return facts


KNOWLEDGE_STATEMENTS = ["The capital of {c} is {v}.", "{v} is the capital city of {c}.", "In {c}, the government sits in {v}."]
KNOWLEDGE_QUESTION = "What is the capital of {c}?"
KNOWLEDGE_QUESTION_OOD = "Which city is the seat of government of {c}?"


# ============================================================ SMALL TALK (pretraining "other text")
def chat_exchange(rng: random.Random) -> tuple:
    """A (request, reply) pair of generic instructions. Shown both raw and in the chat template, these teach
    that the assistant turn plays the role of a raw text's answer; some share a task's form (bare sums, a
    function returning a constant, a question about a word list) but none is a task family, and the tasks
    themselves are only ever raw text."""
    kind = rng.randrange(10)
    w, n = rng.choice(WORDS), rng.randint(0, 90)
    words = rng.sample(WORDS, rng.randint(2, 5))
    if kind == 0:
        return f"Repeat this word: {w}", w
    if kind == 1:
        return f"What number comes after {n}?", str(n + 1)
    if kind == 2:
        return f"Write the word {w} in capital letters.", w.upper()
    if kind == 3:
        name = rng.choice(NAMES)
        return f"Say hello to {name}.", f"Hello, {name}!"
    if kind == 4:
        m = rng.randint(2, 5)
        return f"Count from {n} to {n + m}, one number per line.", "\n".join(str(i) for i in range(n, n + m + 1))
    if kind == 5:
        return f"Write these words one per line: {' '.join(words)}", "\n".join(words)
    if kind == 6:
        return f"How many words are in this list: {' '.join(words)}?", str(len(words))
    if kind == 7:  # the form of a sum, without a story
        lines = arithmetic_drill(rng).split("\n")[: rng.randint(1, 3)]
        return "Compute: " + ", ".join(line.split(" = ")[0] for line in lines), "\n".join(lines)
    if kind == 8:  # the form of a code task: a function returning a constant
        name = f"get_{w}"
        value = rng.choice([n, repr(rng.choice(WORDS))])
        return (f"Write a function that returns {value}.\nYour code should pass these tests:\nassert {name}() == {value}",
                f"def {name}():\n    return {value}")
    i = rng.randrange(len(words) - 1)  # the form of a reading question
    return f"Words: {', '.join(words)}.\n\nQuestion: Which word comes after {words[i]}?", words[i + 1]


# ============================================================ SPLITS AND CORPUS
def user_text(row: dict) -> tuple:
    """(prompt, response) of a row as the chat would show them (same text as common.to_example)."""
    if "test_list" in row:
        return row["text"] + "\nYour code should pass these tests:\n" + "\n".join(row["test_list"]), row["code"]
    if "context" in row:
        return f"{row['context']}\n\nQuestion: {row['question']}", row["answers"]["text"][0]
    if "question" in row:
        return row["question"], row["answer"]
    return row["prompt"], row["response"]


def base_data(seed: int = 0) -> dict:
    """The original splits (sizes SPLITS), the data world/base's corpus was built against: {task: {split: rows}};
    deterministic in the seed. build_data extends it; the pretraining corpus is always made from this."""
    rng = random.Random(seed)
    data = {"math": {}, "code": {}, "rc": {}, "knowledge": {}}
    seen = set()
    for split, n in SPLITS.items():
        rows = []
        while len(rows) < n:
            row = math_problem(rng, "ood" if split == "test_ood" else "train")
            if row["question"] not in seen:
                seen.add(row["question"])
                rows.append(row)
        data["math"][split] = rows
    keys = code_keys()
    rng.shuffle(keys)
    held = {"validation": keys[:40], "test": keys[40:90], "test_ood": keys[40:90]}
    held["train"] = keys[90:]
    for split, split_keys in held.items():
        reps = 1 if split != "train" else 3  # 3 rows (different asserts) per training key
        data["code"][split] = [code_problem(rng, key, 0, "ood" if split == "test_ood" else "train")
                               for _ in range(reps) for key in split_keys]
        for i, row in enumerate(data["code"][split]):
            row["task_id"] = {"train": 1000, "validation": 5000, "test": 6000, "test_ood": 7000}[split] + i
    for split, n in SPLITS.items():
        data["rc"][split] = [rc_problem(rng, f"{split}-{i}", "ood" if split == "test_ood" else "train") for i in range(n)]
    facts = knowledge_facts(seed)
    data["knowledge"]["test"] = [{"prompt": KNOWLEDGE_QUESTION.format(c=c), "response": v, "task": "exact"} for c, v in facts]
    data["knowledge"]["test_ood"] = [{"prompt": KNOWLEDGE_QUESTION_OOD.format(c=c), "response": v, "task": "exact"}
                                     for c, v in facts]
    return data


# The extension. world/base was pretrained on a corpus built against base_data (world_pretrain.py); build_data
# appends new held-out rows from separate generators, each kept out of that corpus and out of every split.
EXTENDED = {"math": {"validation": 1000, "test": 2000, "test_ood": 2000}, "rc": {"test": 1000, "test_ood": 1000}}
CODE_ROWS_PER_KEY = 4  # code test and test_ood: rows per held-out test key (the original one + new asserts)
BASE_CORPUS = {"steps": 2600, "anneal_steps": 400, "batch_size": 16, "seq_length": 256}  # world_pretrain.Args' defaults


def build_data(seed: int = 0) -> dict:
    """All splits of all tasks: base_data's rows (first, in order) with the extended splits appended (EXTENDED,
    CODE_ROWS_PER_KEY), and math_verbose (math/train's questions, answers in verbose_answer's style); deterministic
    in the seed. A new row is rejected if its prompt is in world/base's pretraining corpus (both stages), in a
    training split or already in any split."""
    data = base_data(seed)
    banned = set(base_corpus_prompts(seed))
    banned |= {user_text(r)[0] for task in ("math", "code", "rc") for rows in data[task].values() for r in rows}

    def fresh(row):
        prompt = user_text(row)[0]
        if prompt in banned:
            return False
        banned.add(prompt)
        return True

    rng = random.Random(seed + 1000)
    for split, n in EXTENDED["math"].items():
        rows = data["math"][split]
        while len(rows) < n:
            row = math_problem(rng, "ood" if split == "test_ood" else "train")
            if fresh(row):
                rows.append(row)
    rng = random.Random(seed + 1001)
    keys = [_key_of(r) for r in data["code"]["test"]]  # the held-out test keys (test_ood: the same keys)
    for split, base_id in (("test", 6000), ("test_ood", 7000)):
        rows = data["code"][split]
        used = {key: set(r["test_list"]) for key, r in zip(keys, rows)}
        for _ in range(CODE_ROWS_PER_KEY - 1):
            for key in keys:
                while True:  # new asserts: none shared with another row of this key in this split
                    row = code_problem(rng, key, base_id + len(rows), "ood" if split == "test_ood" else "train")
                    if not used[key] & set(row["test_list"]) and fresh(row):
                        break
                used[key] |= set(row["test_list"])
                rows.append(row)
    rng = random.Random(seed + 1002)
    for split, n in EXTENDED["rc"].items():
        rows = data["rc"][split]
        while len(rows) < n:
            row = rc_problem(rng, f"{split}-{len(rows)}", "ood" if split == "test_ood" else "train")
            if fresh(row):
                rows.append(row)
    data["math_verbose"] = {"train": [{"question": r["question"], "answer": verbose_answer(r)}
                                      for r in data["math"]["train"]]}
    return data


@functools.lru_cache(maxsize=2)
def base_corpus(seed: int = 0) -> tuple:
    """(stage 1, stage 2) documents of world/base's pretraining, regenerated as world_pretrain.pretrain does with its
    default flags (BASE_CORPUS): built against base_data, not build_data. ~275k documents, ~12 s."""
    data, c = base_data(seed), BASE_CORPUS
    n1 = c["steps"] * c["batch_size"] * c["seq_length"] // 45 + 1000
    n2 = c["anneal_steps"] * c["batch_size"] * c["seq_length"] // 45 + 1000
    return (tuple(pretraining_documents(data, n1, seed)),
            tuple(pretraining_documents(data, n2, seed + 100, ANNEAL_MIX)))


@functools.lru_cache(maxsize=2)
def base_corpus_prompts(seed: int = 0) -> frozenset:
    """Every prompt of a raw document of base_corpus (user_text(row)[0] for task documents) and every document's
    full text: what a new held-out row's prompt must not be."""
    docs = [d for stage in base_corpus(seed) for d in stage]
    return frozenset({p for p, _ in docs if p is not None} | {document_text(d) for d in docs})


def held_out_keys(data: dict) -> set:
    """Prompts of every non-training split of math, code and rc: the pretraining corpus never contains them.
    (knowledge is different: its questions probe facts the base model must have memorised in pretraining.)"""
    return {user_text(r)[0] for task in ("math", "code", "rc") for split, rows in data[task].items()
            if split != "train" for r in rows}


MIX = {"math": 26, "drill": 12, "code": 16, "rc": 20, "knowledge": 8, "talk": 18}  # percent of documents
ANNEAL_MIX = {"math": 45, "drill": 25, "code": 8, "rc": 10, "knowledge": 4, "talk": 8}  # the short final stage


def pretraining_documents(data: dict, n_docs: int, seed: int, mix: dict = MIX) -> list:
    """Pretraining documents as (prompt, response) pairs; a raw document is `prompt + "\n\n" + response`, a
    chat document has prompt None and its whole text in response.

    `mix` gives the percent of documents per kind: math, arithmetic drills, code, rc, knowledge (statements, and
    questions raw or in the chat template), small talk (raw or in the chat template). The tasks are only
    ever raw text. Held-out prompts (validation, test, ood) and held-out code keys are skipped; ood phrasings
    are never generated.
    """
    rng = random.Random(seed + 1)
    banned = held_out_keys(data)
    train_keys = sorted({_key_of(r) for r in data["code"]["train"]}, key=str)
    facts = knowledge_facts(seed)
    docs, counter = [], 0
    kinds = [k for k, w in mix.items() for _ in range(w)]
    while len(docs) < n_docs:
        kind = rng.choice(kinds)
        if kind == "math":
            prompt, response = user_text(math_problem(rng))
        elif kind == "drill":
            docs.append((None, arithmetic_drill(rng)))
            continue
        elif kind == "code":
            counter += 1
            prompt, response = user_text(code_problem(rng, rng.choice(train_keys), counter))
        elif kind == "rc":
            prompt, response = user_text(rc_problem(rng, "pretrain"))
        else:
            if kind == "knowledge":
                c, v = rng.choice(facts)
                if rng.random() < 0.4:
                    docs.append((None, rng.choice(KNOWLEDGE_STATEMENTS).format(c=c, v=v)))
                    continue
                turns = [(KNOWLEDGE_QUESTION.format(c=c), v)]
            else:
                turns = [chat_exchange(rng) for _ in range(rng.randint(1, 3))]
            if rng.random() < 0.5:
                docs.append((None, "".join(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n"
                                           for q, a in turns)))
                continue
            prompt, response = turns[0]
        if prompt in banned:
            continue
        docs.append((prompt, response))
    return docs


def document_text(doc: tuple) -> str:
    prompt, response = doc
    return response if prompt is None else f"{prompt}\n\n{response}"


def _key_of(row: dict) -> tuple:
    for fam in CODE_FAMILIES:
        for k in fam[1]:
            word = NUMBER_WORDS[k] if isinstance(k, int) else k
            if row["code"].startswith(f"def {fam[2].format(w=word, k=k)}("):
                return fam[0], k
    raise ValueError(row["code"])


# ============================================================ TOKENIZER
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]


def build_tokenizer(corpus: list, vocab_size: int = 2048):
    """Byte-level BPE with single-digit numbers, trained on the corpus; ChatML template like Qwen's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIALS), special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>",
                                   bos_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def write_jsonl(path: str, rows: list):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(path + ".tmp", path)


def write_data(out: str, seed: int = 0) -> dict:
    data = build_data(seed)
    for task, splits in data.items():
        for split, rows in splits.items():
            write_jsonl(os.path.join(out, "data", task, f"{split}.jsonl"), rows)
    return data


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=WORLD, help="world directory")
    parser.add_argument("--seed", type=int, default=0, help="seed of every generator")
    a = parser.parse_args()
    write_data(a.out, a.seed)
    print(f"world data written to {os.path.join(a.out, 'data')} (the tokenizer and model: world_pretrain.py)")


if __name__ == "__main__":
    main()
