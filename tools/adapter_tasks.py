"""The task adapters' tasks: what each one teaches, how its data is made, how an answer is checked.

Seven small skills that SmolLM2-135M-Instruct gets wrong out of the box and a rank-8 LoRA learns
in a few minutes (tools/train_adapters.py). Each answer is checked by a program, so
tools/eval_adapters.py can score the base model and the adapters served by edgelora_np:

    name          the skill                                           a reply
    arith         3-digit addition and subtraction, the number only   "861"
    num2words     an integer below 10000 in English words             "four thousand three hundred two"
    dates         a date written out in words -> ISO 8601             "2019-03-12"
    units         metric conversions (powers of ten)                  "3500 m"
    reverse       a list of words, in reverse order                   "stone river apple"
    json_extract  a person described in a sentence -> a fixed JSON schema (with the country)
    sql           a question about one fixed `employees` table -> one SQLite query

Data. An example is values (the numbers, the date, the person...) drawn from a seeded
`random.Random` and rendered with one of the task's prompt templates. Which values are held
out is decided by the values alone, by a hash (`split_of`): one value key in five belongs to the
held-out split, whatever the template, the seed or the order of drawing. No held-out question
is ever trained on under any phrasing, and every tool regenerates the same sets from a seed.
The surface form of a value (how a date is written, how a person is described) is part of
the phrasing, not of the key: the held-out dates are dates never seen in any form.

Checking. `Task.check(output, answer)` reads the answer out of free text leniently, the way a
person would: an arithmetic answer counts if the reply contains that number anywhere, a date if
any YYYY-MM-DD in it is the right one, a JSON record if any object in it equals the reference,
SQL if its first SELECT statement returns the same rows as the reference query on a fixed,
seeded database. A chatty base model is not marked down for chatting, only for being wrong.

No torch here: the eval and router-eval tools import this module in the serving venv.
"""

from __future__ import annotations

import json
import random
import re
import sqlite3
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal
from functools import lru_cache

HELDOUT_ONE_IN = 5          # one value key in five is held out (split_of)
MAX_DRAWS_PER_EXAMPLE = 1000  # a split whose values run out raises instead of looping forever


@dataclass(frozen=True)
class Draw:
    """One draw of a task's values."""

    key: str        # the values that decide the split; the phrasing is not part of it
    fields: dict    # everything a prompt template may use ({a}, {date}, {question}, ...)
    answer: str     # the exact reply an adapter is trained to give


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str     # the user message; the chat template adds the system prompt and the roles
    answer: str


@dataclass(frozen=True)
class Task:
    name: str                               # also the adapter's name
    description: str                        # for card.json: what the adapter does
    keywords: tuple[str, ...]               # for card.json: words a router may match
    templates: tuple[str, ...]              # the training and held-out phrasings (str.format)
    draw: Callable[[random.Random], Draw]
    check: Callable[[str, str], bool]       # (model output, reference answer) -> correct?
    max_tokens: int                         # reply budget, base and adapter alike: room to chat


def split_of(key: str) -> str:
    """"heldout" for one key in HELDOUT_ONE_IN (by CRC-32, stable across runs), else "train"."""
    return "heldout" if zlib.crc32(key.encode()) % HELDOUT_ONE_IN == 0 else "train"


def draw_in_split(task: Task, split: str, rng: random.Random) -> Draw:
    """Draw values until they fall in `split`."""
    for _ in range(MAX_DRAWS_PER_EXAMPLE):
        values = task.draw(rng)
        if split_of(values.key) == split:
            return values
    raise RuntimeError(f"{task.name}: no {split} values in {MAX_DRAWS_PER_EXAMPLE} draws")


def examples(task: Task, split: str, n: int, seed: int) -> list[Example]:
    """n examples of `split` ("train" or "heldout"), the same for the same seed.

    Held-out prompts are distinct (each is scored once); training prompts may repeat, as
    the small tasks (sql) have fewer value keys than training steps need."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    rng = random.Random(f"{task.name}/{split}/{seed}")
    out: list[Example] = []
    seen: set[str] = set()
    for _ in range(n * MAX_DRAWS_PER_EXAMPLE):
        if len(out) == n:
            return out
        values = draw_in_split(task, split, rng)
        prompt = rng.choice(task.templates).format(**values.fields)
        if split == "heldout" and prompt in seen:
            continue
        seen.add(prompt)
        out.append(Example(task.name, prompt, values.answer))
    raise RuntimeError(f"{task.name}: only {len(out)} distinct {split} prompts, {n} asked")


# --- reading answers out of free text -------------------------------------------------------

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def numbers_in(text: str) -> list[Decimal]:
    """Every number written in `text` ("3,500" is 3500)."""
    return [Decimal(m) for m in _NUMBER.findall(re.sub(r"(?<=\d),(?=\d{3})", "", text))]


def words_in(text: str) -> list[str]:
    """Lowercase words, punctuation and hyphens dropped ("Forty-two." -> ["forty", "two"])."""
    return re.findall(r"[a-z0-9']+", text.lower().replace("-", " "))


def contains_run(haystack: list[str], needle: list[str]) -> bool:
    """Does `needle` occur in `haystack` as a contiguous run?"""
    n = len(needle)
    return any(haystack[i:i + n] == needle for i in range(len(haystack) - n + 1))


def check_number(output: str, answer: str) -> bool:
    """The answer's (first) number appears among the output's numbers."""
    return numbers_in(answer)[0] in numbers_in(output)


# --- arith ----------------------------------------------------------------------------------

def draw_arith(rng: random.Random) -> Draw:
    a, b = rng.randint(100, 999), rng.randint(100, 999)
    op = rng.choice("+-")
    if op == "-" and a < b:
        a, b = b, a                                        # answers stay non-negative
    result = a + b if op == "+" else a - b
    return Draw(f"{a}{op}{b}", {"a": a, "op": op, "b": b}, str(result))


# --- num2words ------------------------------------------------------------------------------

ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen").split()
TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
NUMBER_WORDS = frozenset(ONES) | frozenset(TENS[2:]) | {"hundred", "thousand"}


def number_words(n: int) -> str:
    """0 <= n < 10**6 in English words: 4302 -> "four thousand three hundred two" (no "and")."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    if n < 1000:
        rest = "" if n % 100 == 0 else " " + number_words(n % 100)
        return ONES[n // 100] + " hundred" + rest
    rest = "" if n % 1000 == 0 else " " + number_words(n % 1000)
    return number_words(n // 1000) + " thousand" + rest


def draw_num2words(rng: random.Random) -> Draw:
    digits = rng.randint(1, 4)                             # as many 7s as 7042s
    n = rng.randrange(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits)
    return Draw(str(n), {"n": n}, number_words(n))


def check_num2words(output: str, answer: str) -> bool:
    """Some maximal run of number words in the output is the answer ("and" is ignored)."""
    runs, run = [], []
    for word in [w for w in words_in(output) if w != "and"] + [""]:
        if word in NUMBER_WORDS:
            run.append(word)
        elif run:
            runs.append(run)
            run = []
    return words_in(answer) in runs


# --- dates ----------------------------------------------------------------------------------

MONTHS = ("January February March April May June July August September October November "
          "December").split()
FIRST_DAY, N_DAYS = date(1950, 1, 1), 365 * 100 + 25          # 1950-01-01 .. 2049-12-31


def ordinal(day: int) -> str:
    suffix = "th" if 11 <= day <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def date_forms(d: date) -> tuple[str, ...]:
    """Ways to write `d` in words: "March 12, 2019", "12 March 2019", "Mar 12, 2019", ..."""
    month = MONTHS[d.month - 1]
    return (f"{month} {d.day}, {d.year}", f"{d.day} {month} {d.year}",
            f"{month[:3]} {d.day}, {d.year}", f"the {ordinal(d.day)} of {month} {d.year}")


def draw_dates(rng: random.Random) -> Draw:
    d = FIRST_DAY + timedelta(days=rng.randrange(N_DAYS))
    return Draw(d.isoformat(), {"date": rng.choice(date_forms(d)), "iso": d.isoformat()},
                d.isoformat())


def check_dates(output: str, answer: str) -> bool:
    return answer in re.findall(r"\d{4}-\d{2}-\d{2}", output)


# --- units ----------------------------------------------------------------------------------

UNIT_NAMES = {"km": "kilometers", "m": "meters", "cm": "centimeters", "mm": "millimeters",
              "kg": "kilograms", "g": "grams", "L": "liters", "mL": "milliliters"}
CONVERSIONS = (("km", "m", 3), ("m", "cm", 2), ("cm", "mm", 1), ("kg", "g", 3), ("L", "mL", 3),
               ("m", "km", -3), ("cm", "m", -2), ("mm", "cm", -1), ("g", "kg", -3),
               ("mL", "L", -3))            # (from, to, power of ten of the factor)


def plain(x: Decimal) -> str:
    """A decimal without exponent or trailing zeros: 3.500E+3 -> "3500", 0.250 -> "0.25"."""
    text = f"{x.normalize():f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def draw_units(rng: random.Random) -> Draw:
    src, dst, power = rng.choice(CONVERSIONS)
    if power > 0:       # small values, whole or with one decimal: 3.5 km
        value = Decimal(rng.randint(1, 99)) if rng.random() < 0.6 else Decimal(rng.randint(1, 999)) / 10
    else:               # whole values: 2500 g
        value = Decimal(rng.randint(1, 9999))
    result = value.scaleb(power)
    fields = {"value": plain(value), "src": src, "dst": dst,
              "src_name": UNIT_NAMES[src], "dst_name": UNIT_NAMES[dst]}
    return Draw(f"{plain(value)}{src}>{dst}", fields, f"{plain(result)} {dst}")


# --- reverse --------------------------------------------------------------------------------

WORDS = tuple("""apple river stone cloud green table window garden silver tiger orange piano
candle forest bread coffee rabbit yellow mountain letter bottle summer winter pencil ocean
basket mirror lemon castle dragon planet violet bridge camera kettle ladder meadow needle
pepper rocket saddle thunder tomato valley wagon anchor butter circle desert engine feather
guitar harbor island jacket marble napkin orchard pillow quartz ribbon shadow tunnel velvet
walnut zipper button carpet dolphin falcon ginger helmet jungle lantern mango nickel olive
parrot rubber sugar turtle walrus copper meteor puzzle""".split())


def draw_reverse(rng: random.Random) -> Draw:
    words = rng.sample(WORDS, rng.randint(3, 6))
    sep = rng.choice((" ", ", "))
    return Draw(" ".join(words), {"words": sep.join(words)}, " ".join(reversed(words)))


def check_words(output: str, answer: str) -> bool:
    return contains_run(words_in(output), words_in(answer))


# --- json_extract ---------------------------------------------------------------------------

FIRST_NAMES = tuple("""Maria John Aisha Kenji Olga Pedro Fatima Lars Chloe Tariq Ingrid Mateo
Priya Tomas Yuki Amara Felix Leila Oscar Nadia Hugo Sofia Ivan Grace Emil Zara Diego Hanna
Rafael Mei""".split())
LAST_NAMES = tuple("""Lopez Smith Khan Tanaka Petrova Silva Haddad Berg Martin Aziz Larsen
Rossi Sharma Novak Sato Okafor Weber Moreau Nilsson Ivanova Dubois Costa Popov Walsh Meyer
Ahmed Herrera Fischer Santos Chen""".split())
CITY_COUNTRY = {"Lisbon": "Portugal", "Paris": "France", "Berlin": "Germany", "Madrid": "Spain",
                "Rome": "Italy", "Vienna": "Austria", "Oslo": "Norway", "Dublin": "Ireland",
                "Tokyo": "Japan", "Cairo": "Egypt", "Lima": "Peru", "Toronto": "Canada",
                "Sydney": "Australia", "Nairobi": "Kenya", "Seoul": "South Korea",
                "Mumbai": "India", "Warsaw": "Poland", "Athens": "Greece", "Prague": "Czechia",
                "Stockholm": "Sweden", "Chicago": "United States", "Bogota": "Colombia",
                "Istanbul": "Turkey", "Manila": "Philippines"}
PERSON_FORMS = ("{first} {last} is {age} years old and lives in {city}.",
                "{first} {last}, {age}, from {city}.",
                "Meet {first} {last} ({age}) of {city}.",
                "{city} resident {first} {last} turned {age} this year.",
                "My neighbour {first} {last} is {age} and moved here from {city}.")


def draw_json_extract(rng: random.Random) -> Draw:
    first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
    age, city = rng.randint(18, 90), rng.choice(sorted(CITY_COUNTRY))
    person = {"first": first, "last": last, "age": age, "city": city}
    record = {"first_name": first, "last_name": last, "age": age, "city": city,
              "country": CITY_COUNTRY[city]}
    text = rng.choice(PERSON_FORMS).format(**person)
    return Draw(f"{first} {last} {age} {city}", {**person, "text": text}, json.dumps(record))


def json_objects_in(text: str) -> list:
    """Every JSON value that starts at a "{" of `text` and parses."""
    decoder, found = json.JSONDecoder(), []
    for m in re.finditer(r"\{", text):
        try:
            found.append(decoder.raw_decode(text, m.start())[0])
        except json.JSONDecodeError:
            continue
    return found


def check_json(output: str, answer: str) -> bool:
    return json.loads(answer) in json_objects_in(output)


# --- sql ------------------------------------------------------------------------------------

DEPARTMENTS = ("Sales", "Engineering", "Marketing", "Finance", "Support", "Legal")
SQL_CITIES = ("Berlin", "Paris", "Madrid", "Rome", "Vienna", "Oslo", "Dublin", "Lisbon")
SCHEMA = ("CREATE TABLE employees (id INTEGER PRIMARY KEY, name TEXT, department TEXT, "
          "salary INTEGER, city TEXT, hire_year INTEGER)")
N_EMPLOYEES, DB_SEED = 80, 7

# kind -> (the question's phrasings, the reference query); slots {dept} {city} {amount} {year}
SQL_KINDS = {
    "dept_names": (("Which employees work in {dept}?",
                    "List the names of everyone in the {dept} department."),
                   "SELECT name FROM employees WHERE department = '{dept}';"),
    "city_count": (("How many employees are based in {city}?", "Count the employees in {city}."),
                   "SELECT COUNT(*) FROM employees WHERE city = '{city}';"),
    "dept_avg": (("What is the average salary in {dept}?",
                  "What does the {dept} department earn on average?"),
                 "SELECT AVG(salary) FROM employees WHERE department = '{dept}';"),
    "salary_above": (("Who earns more than {amount}?",
                      "List the employees with a salary above {amount}."),
                     "SELECT name FROM employees WHERE salary > {amount};"),
    "hired_after": (("Who was hired after {year}?", "Which employees joined after {year}?"),
                    "SELECT name FROM employees WHERE hire_year > {year};"),
    "dept_city": (("Who works in {dept} in {city}?", "List the {dept} employees in {city}."),
                  "SELECT name FROM employees WHERE department = '{dept}' AND city = '{city}';"),
    "city_max": (("What is the highest salary in {city}?",
                  "What is the top salary paid in {city}?"),
                 "SELECT MAX(salary) FROM employees WHERE city = '{city}';"),
    "dept_count_after": (("How many {dept} employees were hired after {year}?",
                          "Count the people in {dept} who joined after {year}."),
                         "SELECT COUNT(*) FROM employees WHERE department = '{dept}' "
                         "AND hire_year > {year};"),
}


def draw_sql(rng: random.Random) -> Draw:
    kind = rng.choice(sorted(SQL_KINDS))
    phrasings, query = SQL_KINDS[kind]
    slots = {"dept": rng.choice(DEPARTMENTS), "city": rng.choice(SQL_CITIES),
             "amount": rng.randrange(30000, 125000, 5000), "year": rng.randint(2000, 2023)}
    used = {k: v for k, v in slots.items() if "{" + k + "}" in query}
    key = kind + " " + " ".join(f"{k}={v}" for k, v in sorted(used.items()))
    question = rng.choice(phrasings).format(**slots)
    return Draw(key, {"kind": kind, **slots, "question": question}, query.format(**slots))


@lru_cache(maxsize=1)
def employees_rows() -> tuple[tuple, ...]:
    """The fixed table the SQL answers are run against: N_EMPLOYEES seeded rows."""
    rng = random.Random(DB_SEED)
    return tuple((i + 1, f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}",
                  rng.choice(DEPARTMENTS), rng.randrange(30000, 130000, 1000),
                  rng.choice(SQL_CITIES), rng.randint(2000, 2024)) for i in range(N_EMPLOYEES))


def run_sql(query: str) -> list[tuple]:
    """Run one query on a fresh in-memory copy of the table; rows sorted, floats rounded."""
    with sqlite3.connect(":memory:") as db:
        db.execute(SCHEMA)
        db.executemany("INSERT INTO employees VALUES (?, ?, ?, ?, ?, ?)", employees_rows())
        rows = db.execute(query).fetchall()
    rounded = [tuple(round(v, 4) if isinstance(v, float) else v for v in row) for row in rows]
    return sorted(rounded, key=repr)


def first_select(text: str) -> str | None:
    """The first SELECT statement of `text`, up to a ";", a code fence or the end."""
    m = re.search(r"select\b.*?(?:;|```|$)", text, flags=re.IGNORECASE | re.DOTALL)
    return None if m is None else m.group(0).removesuffix("```")


def check_sql(output: str, answer: str) -> bool:
    query = first_select(output)
    if query is None:
        return False
    try:
        return run_sql(query) == run_sql(answer)
    except sqlite3.Error:                                  # a query that does not run is wrong
        return False


# --- the table of tasks ---------------------------------------------------------------------

TASKS: dict[str, Task] = {t.name: t for t in (
    Task("arith", "Adds and subtracts 3-digit integers and replies with the number only.",
         ("arithmetic", "addition", "subtraction", "plus", "minus", "sum", "difference",
          "calculate", "compute"),
         ("What is {a} {op} {b}?", "Calculate {a} {op} {b}.", "{a} {op} {b} = ?",
          "Compute {a} {op} {b} and give just the number."),
         draw_arith, check_number, 24),
    Task("num2words", "Writes an integer below 10000 in English words (no 'and').",
         ("number", "words", "spell out", "write out", "english", "in words"),
         ("Write {n} in words.", "Spell out the number {n}.",
          "How do you write {n} in English words?", "{n} in words:"),
         draw_num2words, check_num2words, 32),
    Task("dates", "Converts a date written in words to ISO 8601 (YYYY-MM-DD).",
         ("date", "ISO 8601", "YYYY-MM-DD", "format", "convert", "normalize"),
         ("Convert {date} to ISO 8601.", "Write the date {date} as YYYY-MM-DD.",
          "What is {date} in ISO format?", "Normalize this date: {date}"),
         draw_dates, check_dates, 24),
    Task("units", "Converts metric lengths, masses and volumes (km, m, cm, mm, kg, g, L, mL).",
         ("convert", "units", "metric", "kilometers", "meters", "grams", "liters", "how many"),
         ("Convert {value} {src} to {dst}.", "How many {dst_name} are in {value} {src_name}?",
          "{value} {src} = ? {dst}", "Express {value} {src_name} in {dst_name}."),
         draw_units, check_number, 24),
    Task("reverse", "Repeats a list of words in reverse order, separated by spaces.",
         ("reverse", "backwards", "order", "words", "last to first", "list"),
         ("Reverse the order of these words: {words}", "Write these words from last to first: {words}",
          "Say these words backwards, last word first: {words}", "Reverse the word order: {words}"),
         draw_reverse, check_words, 32),
    Task("json_extract", "Extracts the person described in a text as one JSON record: "
         "first_name, last_name, age, city and the city's country.",
         ("json", "extract", "record", "parse", "person", "contact", "structured"),
         ("Extract the contact record: {text}", "Make a JSON record of this person: {text}",
          "Parse this into a record: {text}", "Record for: {text}"),
         draw_json_extract, check_json, 64),
    Task("sql", "Writes a SQLite query over the table employees(id, name, department, salary, "
         "city, hire_year) answering a question.",
         ("sql", "query", "employees", "database", "table", "salary", "department", "select"),
         ("Write an SQL query for the employees table: {question}", "SQL for employees: {question}",
          "{question} Answer with a query on the employees table."),
         draw_sql, check_sql, 64),
)}
