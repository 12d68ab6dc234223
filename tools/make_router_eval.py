"""Write tests/data/router_eval.jsonl: prompts labelled with the adapter that should serve them.

    python tools/make_router_eval.py [--out tests/data/router_eval.jsonl]

A router picks an adapter for each request from the adapter cards (models/adapters/*/card.json).
This file is its exam: one JSON object a line, {"prompt": ..., "adapter": "<task>" or "none"}.

The prompts are worded apart from the training data on purpose. The templates below were
written separately from the ones in tools/adapter_tasks.py (same values, other wording: word
problems, "please", questions about a check or a spreadsheet), and dates and people are written
in forms the training data never uses. The values come from each task's held-out split, so
no prompt here was trained on. "none" marks requests no adapter fits: chat, poems, advice,
trivia, other programming, and near misses that share a task's words but not its job (the
history of the calendar, what a database index is).

Seeded: the same file comes out every time.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from adapter_tasks import MONTHS, TASKS, draw_in_split, ordinal  # noqa: E402

OUT = Path(__file__).parent.parent / "tests" / "data" / "router_eval.jsonl"
SEED = 2024
PER_TASK = 40

ARITH = {"+": ("Quick math: {a} plus {b}?", "Please add {a} and {b}.",
               "What's the sum of {a} and {b}?", "Can you work out {a}+{b} for me?",
               "I have {a} apples and get {b} more. How many apples do I have now?",
               "Tell me the total of {a} and {b}."),
         "-": ("Quick math: {a} minus {b}?", "Please subtract {b} from {a}.",
               "What's the difference between {a} and {b}?", "Can you work out {a}-{b} for me?",
               "I had {a} dollars and spent {b}. How much is left?",
               "Take {b} away from {a}. What remains?")}

NUM2WORDS = ("How would {n} be written out as words on a check?",
             "Spell {n} using letters instead of digits.",
             "Give me the English name of the number {n}.",
             "Could you write out {n} in full words?",
             "Turn the numeral {n} into words, please.",
             "What is {n} when written in letters?")

DATES = ("My birthday is {date}. What is that in YYYY-MM-DD?",
         "Reformat '{date}' as an ISO date.",
         "Change the date {date} to year-month-day numbers.",
         "I need {date} in ISO 8601 for a spreadsheet.",
         "Turn {date} into the format 2024-01-31.",
         "Machine-readable version of {date}, please (ISO).")

UNITS = ("Something measures {value} {src_name}; what is that in {dst_name}?",
         "What's {value} {src} expressed in {dst}?",
         "Turn {value} {src_name} into {dst_name}.",
         "If I have {value} {src}, how many {dst} is that?",
         "Quick conversion please: {value} {src} to {dst}",
         "My recipe says {value} {src}. How much is that in {dst_name}?")

REVERSE = ("Flip the order of this list: {words}",
           "Read this sequence back to me from the end: {words}",
           "Can you list these in the opposite order? {words}",
           "Turn this word list around: {words}",
           "Backwards please: {words}",
           "Write the list {words} starting from its last item.")

JSON_EXTRACT = ("Give me a structured record (JSON) for: {text}",
                "Pull the person's details out of this sentence as JSON: {text}",
                "Convert this description into a data record: {text}",
                "I need this person's info as a JSON object: {text}",
                "Fill in the contact fields from this text: {text}",
                "Structured data, please. {text}")
PEOPLE = ("{first} {last} ({city}, age {age})",
          "Our new colleague is {first} {last}; {age} years young, based in {city}.",
          "Name: {first} {last}. Lives in {city}. {age} years old.",
          "{first} {last} celebrated a {age}th birthday in {city}.")

SQL = {"dept_names": "Give me a query listing staff names from the {dept} team.",
       "city_count": "Query to count how many staff members sit in the {city} office.",
       "dept_avg": "I need SQL that computes the mean salary for {dept}.",
       "salary_above": "Write a SELECT that finds employees paid over {amount}.",
       "hired_after": "SQL to find everyone on the employees table hired later than {year}.",
       "dept_city": "Query the employees table for {dept} people located in {city}.",
       "city_max": "Which query returns the maximum salary in the {city} office?",
       "dept_count_after": "Give me SQL counting {dept} hires made after {year}."}

NONE = (
    "Write a short poem about the ocean at night.",
    "Tell me a joke about cats.",
    "What is the capital of France?",
    "How are you doing today?",
    "Give me three tips for sleeping better.",
    "Who wrote Romeo and Juliet?",
    "Explain photosynthesis in simple terms.",
    "What's a good name for a pet goldfish?",
    "Write a haiku about autumn leaves.",
    "Why is the sky blue?",
    "Recommend a good book for a long flight.",
    "How do I boil an egg?",
    "What are the benefits of regular exercise?",
    "Summarize the plot of Cinderella in two sentences.",
    "Write a Python function that checks whether a string is a palindrome.",
    "What is the difference between a list and a tuple in Python?",
    "Translate 'good morning' into Spanish.",
    "Hello! Can you introduce yourself?",
    "Describe the smell of rain.",
    "What should I pack for a weekend camping trip?",
    "Who painted the Mona Lisa?",
    "Write a limerick about a forgetful wizard.",
    "How many planets are in the solar system?",
    "Give me a motivational quote for Monday morning.",
    "What's the best way to learn to play guitar?",
    "Explain what a black hole is.",
    "Can you suggest a vegetarian dinner idea?",
    "What is the tallest mountain in the world?",
    "Write a thank-you note to my neighbour for watering my plants.",
    "How do airplanes stay in the air?",
    "Tell me a fun fact about octopuses.",
    "What does a database index do, conceptually?",
    "Who invented the Gregorian calendar?",
    "Why did the metric system spread around the world?",
    "What is your favourite number and why?",
    "Is it better to rent or to buy a house?",
    "Write a two-line story about a lost umbrella.",
    "What language is spoken in Brazil?",
    "How can I be more productive when working from home?",
    "Describe a sunset to someone who has never seen one.",
    "What are some good habits for saving money?",
    "Explain the rules of chess briefly.",
    "What is the meaning of the word 'serendipity'?",
    "Write a JavaScript snippet that logs 'hello' to the console.",
    "Why do cats purr?",
    "Give me a riddle and its answer.",
    "How do vaccines work?",
    "What's the history of the Olympic Games?",
    "Write a birthday message for my grandmother.",
    "What are the primary colors?",
    "Can you explain what machine learning is?",
    "What is the boiling point of water at sea level?",
    "Suggest a name for a coffee shop.",
    "How do I politely decline a meeting invitation?",
    "What is the largest ocean on Earth?",
    "Write a short bedtime story about a brave mouse.",
    "What are the health benefits of green tea?",
    "Tell me about the Great Wall of China.",
    "What makes a good password?",
    "Compose a cheerful song chorus about spring.",
)


def arith_prompt(f: dict, rng: random.Random) -> str:
    return rng.choice(ARITH[f["op"]]).format(**f)


def dates_prompt(f: dict, rng: random.Random) -> str:
    d = date.fromisoformat(f["iso"])
    month = MONTHS[d.month - 1]
    written = rng.choice((f"{month} {ordinal(d.day)} {d.year}", f"{d.day} {month[:3]}. {d.year}",
                          f"{ordinal(d.day)} {month}, {d.year}"))
    return rng.choice(DATES).format(date=written)


def json_prompt(f: dict, rng: random.Random) -> str:
    return rng.choice(JSON_EXTRACT).format(text=rng.choice(PEOPLE).format(**f))


def reverse_prompt(f: dict, rng: random.Random) -> str:
    return rng.choice(REVERSE).format(words=f["words"].replace(", ", " ").replace(" ", ", "))


PROMPTERS = {
    "arith": arith_prompt,
    "num2words": lambda f, rng: rng.choice(NUM2WORDS).format(**f),
    "dates": dates_prompt,
    "units": lambda f, rng: rng.choice(UNITS).format(**f),
    "reverse": reverse_prompt,
    "json_extract": json_prompt,
    "sql": lambda f, rng: SQL[f["kind"]].format(**f),
}


def task_prompts(name: str, rng: random.Random) -> list[str]:
    """PER_TASK distinct prompts for `name`, with held-out values."""
    prompts: list[str] = []
    while len(prompts) < PER_TASK:
        prompt = PROMPTERS[name](draw_in_split(TASKS[name], "heldout", rng).fields, rng)
        if prompt not in prompts:
            prompts.append(prompt)
    return prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if set(PROMPTERS) != set(TASKS):
        sys.exit(f"router templates cover {sorted(PROMPTERS)}, the tasks are {sorted(TASKS)}")
    rng = random.Random(SEED)
    rows = [{"prompt": p, "adapter": name} for name in TASKS for p in task_prompts(name, rng)]
    rows += [{"prompt": p, "adapter": "none"} for p in NONE]
    rng.shuffle(rows)
    with args.out.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"wrote {len(rows)} prompts ({len(NONE)} 'none') to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
