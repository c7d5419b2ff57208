"""The bundled sample task: extract an order from one sentence into strict JSON.

Every JSON value is copied verbatim from the sentence (the item in its singular form), so a
135M-parameter model learns it in a couple of hundred LoRA steps, and the task metric
(parsed JSON equal to the reference) shows a clear gain over the untuned base.
Generated from a seeded `random.Random`: no third-party data, same seed -> same rows.
"""

from __future__ import annotations

import json
import random

NAME = "json-extract"
SYSTEM = "Extract the order as JSON with keys name, quantity, item, color, city. Answer with JSON only."

NAMES = [
    "Maria", "Ken", "Aisha", "Lars", "Sofia", "Diego", "Yuki", "Omar", "Elena", "Tom",
    "Priya", "Jonas", "Chen", "Fatima", "Luca", "Nora", "Ivan", "Grace", "Mateo", "Hana",
    "Samir", "Olivia", "Pedro", "Ingrid", "Kofi", "Anna", "Raj", "Zoe", "Emil", "Lina",
]
# (singular, plural): the JSON always holds the singular.
ITEMS = [
    ("mug", "mugs"), ("lamp", "lamps"), ("chair", "chairs"), ("notebook", "notebooks"),
    ("backpack", "backpacks"), ("kettle", "kettles"), ("pillow", "pillows"), ("candle", "candles"),
    ("umbrella", "umbrellas"), ("bottle", "bottles"), ("blanket", "blankets"), ("towel", "towels"),
    ("clock", "clocks"), ("basket", "baskets"), ("jacket", "jackets"), ("helmet", "helmets"),
    ("teapot", "teapots"), ("wallet", "wallets"), ("box", "boxes"), ("glass", "glasses"),
]
COLORS = ["red", "blue", "green", "black", "white", "yellow", "orange", "purple", "grey", "pink"]
CITIES = [
    "Lisbon", "Oslo", "Berlin", "Madrid", "Tokyo", "Cairo", "Lima", "Dublin", "Vienna", "Prague",
    "Nairobi", "Seoul", "Toronto", "Mumbai", "Athens", "Helsinki", "Chicago", "Sydney",
    "New York", "Buenos Aires",
]
TEMPLATES = [
    "{name} ordered {q} {color} {items} for delivery to {city}.",
    "Ship {q} {color} {items} to {city}, please - the buyer is {name}.",
    "New order from {name}: {q} {color} {items}, deliver to {city}.",
    "Please send {q} {color} {items} to {name} in {city}.",
    "{name} from {city} wants {q} {color} {items}.",
    "Order: {q} x {color} {item} | customer: {name} | city: {city}",
    "Can you deliver {q} {color} {items} to {city}? It's for {name}.",
    "{city} branch: {name} just bought {q} {color} {items}.",
    "Hi, this is {name}. I'd like {q} {color} {items} shipped to {city}.",
    "Deliver to {city}: {q} {color} {items} (customer {name}).",
]


def make_row(rng: random.Random) -> dict:
    name, (item, plural), color, city = (
        rng.choice(NAMES), rng.choice(ITEMS), rng.choice(COLORS), rng.choice(CITIES)
    )
    q = rng.randint(1, 12)
    sentence = rng.choice(TEMPLATES).format(
        name=name, q=q, color=color, city=city, item=item, items=item if q == 1 else plural
    )
    answer = {"name": name, "quantity": q, "item": item, "color": color, "city": city}
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": sentence},
            {"role": "assistant", "content": json.dumps(answer, separators=(",", ":"))},
        ]
    }


def generate_rows(n: int, seed: int) -> list[dict]:
    """`n` unique chat rows of the sample task; the same (n, seed) always gives the same rows."""
    rng = random.Random(seed)
    rows, seen = [], set()
    for _ in range(50 * n + 1000):  # ~29M combinations: duplicates are rare, the bound is a guard
        if len(rows) == n:
            return rows
        row = make_row(rng)
        sentence = row["messages"][1]["content"]
        if sentence not in seen:
            seen.add(sentence)
            rows.append(row)
    raise ValueError(f"Could not generate {n} unique sample rows.")
