"""Generated math and chat text for the embedded tiny target's corpus.

Two generators, both deterministic given a ``random.Random``:

* ``math_example``: an arithmetic word problem and a step-by-step solution that ends with
  ``The answer is N.`` (or ``\\boxed{N}`` when the question carries the usual "reason step by
  step" suffix);
* ``chat_example``: a short question about everyday topics or Python, and a plain answer.

Every example is a ``(question, answer)`` pair. ``render_document`` lays it out the way the
embedded tokenizer's chat template renders a conversation (user text, a newline, then the
assistant's text), so a chat-formatted prompt at evaluation time is in the model's domain.
The prompts of ``dflash/builtin_prompts.py`` are evaluation prompts: ``is_eval_prompt`` lets
callers drop any generated question that happens to equal one of them.
"""
from __future__ import annotations

import random

from ..builtin_prompts import BUILTIN_SETS

STEP_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."

_EVAL_PROMPTS = {p.strip() for prompts in BUILTIN_SETS.values() for p in prompts}


def is_eval_prompt(question: str) -> bool:
    """True when ``question`` (suffix removed) is one of the built-in evaluation prompts."""
    return question.replace(STEP_SUFFIX, "").strip() in _EVAL_PROMPTS


def render_document(question: str, answer: str) -> str:
    """The text of one conversation as the embedded chat template lays it out (no eos)."""
    q = question if question.endswith("\n") else question + "\n"
    return q + answer


# ----------------------------------------------------------------------------- math
NAMES = ["Anna", "Ben", "Carlos", "Dina", "Eli", "Fatima", "George", "Hana", "Ivan", "Julia",
         "Kofi", "Lena", "Marco", "Nora", "Omar", "Paula", "Quinn", "Rosa", "Sam", "Tara",
         "Uma", "Victor", "Wendy", "Yusuf", "Zoe", "Priya", "Liam", "Mei", "Noah", "Olga"]
ITEMS = ["apples", "marbles", "stickers", "books", "pencils", "cards", "stamps", "cookies",
         "oranges", "coins", "shells", "balloons", "candies", "toy cars", "flowers", "eggs",
         "buttons", "pens", "bottles", "notebooks"]
CONTAINERS = [("box", "boxes"), ("bag", "bags"), ("basket", "baskets"), ("jar", "jars"),
              ("crate", "crates"), ("pack", "packs"), ("tray", "trays"), ("shelf", "shelves")]
THINGS_BOUGHT = [("notebook", "notebooks"), ("ticket", "tickets"), ("sandwich", "sandwiches"),
                 ("shirt", "shirts"), ("mug", "mugs"), ("game", "games"), ("plant", "plants"),
                 ("lamp", "lamps"), ("cake", "cakes"), ("ball", "balls")]
VEHICLES = ["car", "train", "bus", "cyclist", "truck", "boat", "runner"]


def _he(name: str) -> str:
    female = {"Anna", "Dina", "Fatima", "Hana", "Julia", "Lena", "Nora", "Paula", "Rosa", "Tara",
              "Uma", "Wendy", "Zoe", "Priya", "Mei", "Olga"}
    return "she" if name in female else "he"


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _m_add_sub(r):
    n, it = r.choice(NAMES), r.choice(ITEMS)
    he = _he(n)
    a = r.randint(5, 90)
    steps, q = [f"{n} starts with {a} {it}."], f"{n} has {a} {it}."
    total = a
    for _ in range(r.randint(1, 3)):
        if r.random() < 0.5 or total < 3:
            b = r.randint(2, 40)
            verb = r.choice(["buys", "finds", "gets", "is given", "collects"])
            q += f" {_cap(he)} {verb} {b} more {it}."
            steps.append(f"After that {he} has {total} + {b} = {total + b} {it}.")
            total += b
        else:
            b = r.randint(1, total - 1)
            verb = r.choice(["gives away", "loses", "sells", "uses", "eats"]) \
                if it in ("cookies", "candies", "apples", "oranges", "eggs") else \
                r.choice(["gives away", "loses", "sells", "lends"])
            q += f" Then {he} {verb} {b} {it}."
            steps.append(f"After that {he} has {total} - {b} = {total - b} {it}.")
            total -= b
    q += f" How many {it} does {n} have now?"
    return q, steps, total


def _m_groups(r):
    n, it = r.choice(NAMES), r.choice(ITEMS)
    c1, cn = r.choice(CONTAINERS)
    g, k = r.randint(2, 15), r.randint(3, 30)
    q = f"A {c1} holds {k} {it}. {n} has {g} {cn}."
    total = g * k
    steps = [f"Each {c1} holds {k} {it} and there are {g} {cn}.",
             f"So there are {g} * {k} = {total} {it} in all."]
    if r.random() < 0.6:
        used = r.randint(1, total - 1)
        q += f" {_cap(_he(n))} gives {used} {it} to friends. How many {it} are left?"
        steps.append(f"After giving away {used}, {total} - {used} = {total - used} {it} are left.")
        total -= used
    else:
        q += f" How many {it} does {n} have in total?"
    return q, steps, total


def _m_rate(r):
    v = r.choice(VEHICLES)
    s1, t1 = r.randint(4, 90), r.randint(2, 8)
    q = f"A {v} travels {s1} km per hour for {t1} hours."
    d1 = s1 * t1
    steps = [f"In the first part it travels {s1} * {t1} = {d1} km."]
    total = d1
    if r.random() < 0.6:
        s2, t2 = r.randint(4, 90), r.randint(1, 6)
        d2 = s2 * t2
        q += f" Then it travels {s2} km per hour for {t2} hours."
        steps.append(f"In the second part it travels {s2} * {t2} = {d2} km.")
        steps.append(f"In total it travels {d1} + {d2} = {d1 + d2} km.")
        total = d1 + d2
    q += " How far does it travel in total?"
    return q, steps, total


def _m_change(r):
    n = r.choice(NAMES)
    one, many = r.choice(THINGS_BOUGHT)
    price, count = r.randint(2, 25), r.randint(2, 9)
    cost = price * count
    bill = next(b for b in (10, 20, 50, 100, 200, 500) if b >= cost)
    q = (f"A shop sells {many} for {price} dollars each. {n} buys {count} {many} "
         f"and pays with a {bill} dollar bill. How much change does {_he(n)} get?")
    steps = [f"The {many} cost {count} * {price} = {cost} dollars.",
             f"The change is {bill} - {cost} = {bill - cost} dollars."]
    return q, steps, bill - cost


def _m_share(r):
    n, it = r.choice(NAMES), r.choice(ITEMS)
    k, each = r.randint(2, 9), r.randint(2, 15)
    extra = r.randint(0, 20)
    total = k * each + extra
    q = f"{n} has {total} {it}. {_cap(_he(n))} gives {each} {it} to each of {k} friends. How many {it} does {n} keep?"
    steps = [f"{n} gives away {k} * {each} = {k * each} {it}.",
             f"{n} keeps {total} - {k * each} = {extra} {it}."]
    return q, steps, extra


def _m_divide(r):
    n, it = r.choice(NAMES), r.choice(ITEMS)
    k, each = r.randint(2, 12), r.randint(2, 20)
    total = k * each
    q = f"{n} shares {total} {it} equally among {k} children. How many {it} does each child get?"
    steps = [f"Each child gets {total} / {k} = {each} {it}."]
    return q, steps, each


def _m_rect(r):
    a, b = r.randint(2, 40), r.randint(2, 40)
    what = r.choice(["A rectangle", "A garden", "A room", "A field", "A table top"])
    if r.random() < 0.5:
        q = f"{what} is {a} meters long and {b} meters wide. What is its area?"
        steps = [f"The area is length times width: {a} * {b} = {a * b} square meters."]
        return q, steps, a * b
    q = f"{what} is {a} meters long and {b} meters wide. What is its perimeter?"
    steps = [f"The perimeter is 2 * ({a} + {b}).", f"{a} + {b} = {a + b}.",
             f"2 * {a + b} = {2 * (a + b)} meters."]
    return q, steps, 2 * (a + b)


def _m_equation(r):
    x, a = r.randint(1, 99), r.randint(1, 99)
    if r.random() < 0.5:
        q = f"If x + {a} = {x + a}, what is x?"
        steps = [f"Subtract {a} from both sides: x = {x + a} - {a}.", f"So x = {x}."]
    else:
        m = r.randint(2, 12)
        q = f"If {m}x = {m * x}, what is x?"
        steps = [f"Divide both sides by {m}: x = {m * x} / {m}.", f"So x = {x}."]
    return q, steps, x


def _m_sum_range(r):
    n = r.randint(5, 60)
    q = f"What is the sum of all whole numbers from 1 to {n}?"
    s = n * (n + 1) // 2
    steps = [f"The sum of 1 to n is n * (n + 1) / 2.", f"Here n = {n}, so the sum is "
             f"{n} * {n + 1} / 2 = {n * (n + 1)} / 2 = {s}."]
    return q, steps, s


def _m_expression(r):
    a, b, c = r.randint(2, 40), r.randint(2, 40), r.randint(1, 200)
    op = r.choice(["+", "-"])
    val = a * b + c if op == "+" else a * b - c
    q = f"Compute {a} * {b} {op} {c} and show each step."
    steps = [f"First multiply: {a} * {b} = {a * b}.",
             f"Then {a * b} {op} {c} = {val}."]
    return q, steps, val


def _m_percent(r):
    p = r.choice([5, 10, 15, 20, 25, 30, 40, 50, 60, 75])
    base = r.choice([20, 40, 60, 80, 100, 120, 160, 200, 240, 300, 400, 500, 800])
    val = p * base // 100
    q = f"What is {p} percent of {base}?"
    steps = [f"{p} percent means {p} / 100.", f"{base} * {p} / 100 = {base * p} / 100 = {val}."]
    return q, steps, val


def _m_age(r):
    n = r.choice(NAMES)
    child, k, later = r.randint(2, 15), r.randint(2, 4), r.randint(1, 10)
    parent = child * k
    q = (f"{n} is {k} times as old as {r.choice(['her', 'his'])} nephew. The nephew is {child} "
         f"years old. How old will {n} be in {later} years?")
    steps = [f"{n} is {k} * {child} = {parent} years old now.",
             f"In {later} years {n} will be {parent} + {later} = {parent + later} years old."]
    return q, steps, parent + later


def _m_average(r):
    n = r.choice(NAMES)
    k = r.randint(2, 5)
    vals = [r.randint(1, 20) for _ in range(k)]
    tot = sum(vals)
    while tot % k:
        vals[-1] += 1
        tot += 1
    days = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"][:k]
    parts = ", ".join(f"{v} km on {d}" for v, d in zip(vals[:-1], days[:-1]))
    q = f"{n} runs {parts} and {vals[-1]} km on {days[k - 1]}. What is the average distance per run?"
    steps = [f"The total distance is {' + '.join(map(str, vals))} = {tot} km.",
             f"There are {k} runs, so the average is {tot} / {k} = {tot // k} km."]
    return q, steps, tot // k


def _m_leak(r):
    cap, rate, hours = r.randint(100, 900), r.randint(5, 40), r.randint(2, 8)
    while rate * hours > cap:
        hours -= 1
    q = (f"A tank holds {cap} liters of water. {rate} liters leak out each hour. "
         f"How much water is left after {hours} hours?")
    steps = [f"In {hours} hours, {hours} * {rate} = {hours * rate} liters leak out.",
             f"{cap} - {hours * rate} = {cap - hours * rate} liters are left."]
    return q, steps, cap - hours * rate


MATH_KINDS = [_m_add_sub, _m_groups, _m_rate, _m_change, _m_share, _m_divide, _m_rect,
              _m_equation, _m_sum_range, _m_expression, _m_percent, _m_age, _m_average, _m_leak]


def math_example(r: random.Random) -> tuple[str, str]:
    while True:
        q, steps, result = r.choice(MATH_KINDS)(r)
        if r.random() < 0.3:
            q += STEP_SUFFIX
            tail = f"The answer is \\boxed{{{result}}}."
        else:
            tail = f"The answer is {result}."
        if not is_eval_prompt(q):
            return q, "\n".join(steps + [tail])


# ----------------------------------------------------------------------------- chat
# Topic -> (short definition sentences, tips). Written for this project.
TOPICS = {
    "a list in Python": (
        ["A list is an ordered collection of values.", "You write a list with square brackets, "
         "for example [1, 2, 3].", "Lists can grow and shrink: append adds an item and pop "
         "removes one.", "You can change an item by its index, like items[0] = 5."],
        ["Use a list when the order of the items matters.", "Use append to add items one by one.",
         "Use a list comprehension to build a new list from an old one."]),
    "a dictionary in Python": (
        ["A dictionary maps keys to values.", "You write it with curly braces, for example "
         "{\"a\": 1, \"b\": 2}.", "Looking up a value by its key is fast.",
         "Keys must be hashable, such as strings, numbers or tuples."],
        ["Use get to read a key that may be missing.", "Use items to loop over keys and values.",
         "Use a dictionary when you need to find values by name."]),
    "a tuple in Python": (
        ["A tuple is an ordered collection that cannot be changed after it is made.",
         "You write it with parentheses, for example (1, 2).", "Tuples are often used to "
         "return several values from a function."],
        ["Use a tuple for a fixed group of values.", "Unpack a tuple with a, b = pair."]),
    "a function": (
        ["A function is a named block of code that does one job.", "It takes arguments and "
         "can return a value.", "In Python you define a function with the def keyword."],
        ["Give each function one clear purpose.", "Choose a name that says what it does.",
         "Write a short docstring."]),
    "a class": (
        ["A class is a blueprint for objects.", "It groups data and the functions that work on "
         "that data.", "In Python you define a class with the class keyword, and __init__ sets "
         "up a new object."],
        ["Keep classes small.", "Put related data and behaviour together."]),
    "recursion": (
        ["Recursion is when a function calls itself.", "Each call works on a smaller part of "
         "the problem.", "A base case stops the calls, for example factorial(0) returns 1."],
        ["Always write the base case first.", "Make sure every call gets closer to the base "
         "case."]),
    "an exception": (
        ["An exception is an error that happens while a program runs.", "In Python you can "
         "catch it with try and except.", "You can raise your own exception with raise."],
        ["Catch only the exceptions you can handle.", "Give error messages that explain what "
         "went wrong."]),
    "a loop": (
        ["A loop repeats a block of code.", "A for loop goes over the items of a sequence.",
         "A while loop runs as long as a condition is true."],
        ["Use for when you know what to loop over.", "Make sure a while loop can end."]),
    "version control": (
        ["Version control records the changes to your files over time.", "It lets you go back "
         "to an older version and see who changed what.", "Git is the most common tool for it."],
        ["Commit small changes often.", "Write a clear message for each commit.",
         "Use branches for new work."]),
    "unit testing": (
        ["A unit test checks one small piece of code on its own.", "It calls a function with "
         "known input and compares the result with the expected output.", "Tests catch bugs "
         "early and make changes safer."],
        ["Test one thing in each test.", "Run the tests often.", "Give tests clear names."]),
    "regular exercise": (
        ["Regular exercise makes the heart and muscles stronger.", "It helps you sleep better "
         "and improves your mood.", "Even a short walk every day makes a difference."],
        ["Start slowly and build up.", "Pick an activity you enjoy.", "Exercise at the same "
         "time each day."]),
    "good sleep": (
        ["Good sleep helps the body recover and the mind stay sharp.", "Most adults need seven "
         "to nine hours each night."],
        ["Go to bed at the same time every night.", "Keep the bedroom dark and cool.",
         "Avoid screens for an hour before bed.", "Avoid coffee late in the day."]),
    "a budget": (
        ["A budget is a plan for your money.", "It lists what you earn and what you spend each "
         "month."],
        ["Write down all your income.", "Track your spending for a month.",
         "Set a limit for each kind of expense.", "Save a fixed amount first."]),
    "healthy plants": (
        ["Plants need light, water and the right temperature.", "Too much water is a common "
         "reason plants die."],
        ["Water only when the soil is dry.", "Give them as much light as you can.",
         "Keep them away from cold drafts.", "Remove dead leaves."]),
    "clear emails": (
        ["A clear email is short and easy to act on.", "The reader should know in the first "
         "line what you want."],
        ["Write a specific subject line.", "Put the main point first.", "Keep paragraphs "
         "short.", "End with the next step you expect."]),
    "studying for an exam": (
        ["Good exam preparation starts early.", "Spreading study time over many days works "
         "better than one long night."],
        ["Make a plan for each day.", "Test yourself instead of only reading.",
         "Take short breaks.", "Sleep well before the exam."]),
    "learning a new language": (
        ["Learning a language takes steady practice.", "Listening, speaking, reading and "
         "writing all help each other."],
        ["Practice a little every day.", "Learn the most common words first.",
         "Speak with native speakers.", "Listen to music and podcasts in the language."]),
    "working from home": (
        ["Working from home gives freedom but needs discipline.", "A clear routine helps you "
         "stay focused."],
        ["Keep a separate place for work.", "Start and stop at fixed times.",
         "Take short breaks.", "Turn off notifications you do not need."]),
    "a hiking trip": (
        ["A good hiking trip starts with a plan.", "Check the weather and the route before you "
         "go."],
        ["Bring enough water.", "Wear good shoes.", "Pack a rain jacket.", "Tell someone "
         "where you are going.", "Bring a map and a snack."]),
    "cooking a simple dinner": (
        ["A simple dinner can be healthy and quick.", "A pan, a few vegetables and a source of "
         "protein are enough."],
        ["Cook rice or pasta first.", "Fry vegetables with a little oil.",
         "Add eggs, beans or chicken.", "Season with salt, pepper and herbs."]),
    "a productive morning": (
        ["A productive morning starts the night before.", "A short routine helps you start "
         "the day calm."],
        ["Wake up at the same time each day.", "Drink a glass of water.",
         "Do the hardest task first.", "Plan your day in five minutes."]),
    "a good meeting": (
        ["A good meeting has a clear goal.", "Everyone should know why they are there."],
        ["Share an agenda before the meeting.", "Start and end on time.",
         "Write down decisions and who does what."]),
}

PY_TASKS = [
    ("reverse a list", "You can use slicing or the reverse method.",
     "items = [1, 2, 3]\nreversed_items = items[::-1]\nitems.reverse()"),
    ("remove duplicates from a list", "Convert the list to a dict and back to keep the order.",
     "items = [3, 1, 3, 2, 1]\nunique = list(dict.fromkeys(items))"),
    ("read a file", "Open it with a with statement so it is closed for you.",
     "with open(\"data.txt\") as fh:\n    text = fh.read()"),
    ("write text to a file", "Open the file in write mode.",
     "with open(\"out.txt\", \"w\") as fh:\n    fh.write(\"hello\\n\")"),
    ("join a list of strings", "Use the join method of the separator.",
     "words = [\"a\", \"b\", \"c\"]\ntext = \", \".join(words)"),
    ("count words in a string", "Split the string and use a Counter.",
     "from collections import Counter\ncounts = Counter(text.split())"),
    ("sort a list of numbers", "Use sorted for a new list or sort to change the list.",
     "numbers = [5, 2, 9]\nordered = sorted(numbers)\nnumbers.sort(reverse=True)"),
    ("check if a key is in a dictionary", "Use the in operator.",
     "if \"name\" in person:\n    print(person[\"name\"])"),
    ("loop over a list with indexes", "Use enumerate.",
     "for i, item in enumerate(items):\n    print(i, item)"),
    ("convert a string to an integer", "Use int, and catch ValueError for bad input.",
     "try:\n    n = int(text)\nexcept ValueError:\n    n = 0"),
    ("get the current date", "Use the datetime module.",
     "from datetime import date\ntoday = date.today()"),
    ("find the largest number in a list", "Use max.",
     "numbers = [4, 8, 1]\nlargest = max(numbers)"),
    ("make a list of squares", "A list comprehension is short and clear.",
     "squares = [n * n for n in range(10)]"),
    ("merge two dictionaries", "Use the | operator or update.",
     "merged = a | b\na.update(b)"),
    ("split a string into lines", "Use splitlines.",
     "lines = text.splitlines()"),
    ("round a number to two decimals", "Use round or a format string.",
     "value = round(3.14159, 2)\ntext = f\"{3.14159:.2f}\""),
]

_CHAT_Q_WHAT = ["What is {t}?", "Can you explain {t}?", "Explain {t} in simple words.",
                "Tell me about {t}.", "What should I know about {t}?"]
_CHAT_Q_TIPS = ["Give me {n} tips for {t}.", "What are {n} good tips for {t}?",
                "How can I get better at {t}? Give me {n} tips.",
                "List {n} tips for {t}."]
_CHAT_Q_PY = ["How do I {t} in Python?", "What is the easiest way to {t} in Python?",
              "Can you show me how to {t} in Python?", "How can I {t} with Python?"]
_NUM_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}


def chat_example(r: random.Random) -> tuple[str, str]:
    while True:
        kind = r.random()
        if kind < 0.4:
            topic, (facts, tips) = r.choice(list(TOPICS.items()))
            q = r.choice(_CHAT_Q_WHAT).format(t=topic)
            k = r.randint(2, len(facts))
            body = facts[:k]
            if r.random() < 0.5:
                body = body + [r.choice(tips)]
            a = " ".join(body)
        elif kind < 0.7:
            topic, (facts, tips) = r.choice(list(TOPICS.items()))
            n = r.randint(2, min(5, len(tips))) if len(tips) >= 2 else 1
            nw = _NUM_WORDS.get(n, str(n))
            q = r.choice(_CHAT_Q_TIPS).format(n=nw, t=topic)
            chosen = r.sample(tips, n)
            lines = [f"Here are {nw} tips for {topic}:"]
            lines += [f"{i + 1}. {tip}" for i, tip in enumerate(chosen)]
            a = "\n".join(lines)
        else:
            task, expl, code = r.choice(PY_TASKS)
            q = r.choice(_CHAT_Q_PY).format(t=task)
            a = f"{expl}\n\n```python\n{code}\n```"
            if r.random() < 0.5:
                a = f"To {task} in Python: " + a[0].lower() + a[1:]
        if not is_eval_prompt(q):
            return q, a


def synth_examples(n_math: int, n_chat: int, seed: int) -> list[tuple[str, str]]:
    """``n_math`` math and ``n_chat`` chat examples, shuffled, deterministic for ``seed``."""
    r = random.Random(seed)
    out = [math_example(r) for _ in range(n_math)] + [chat_example(r) for _ in range(n_chat)]
    r.shuffle(out)
    return out
