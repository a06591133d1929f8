"""Short texts on a few topics, drawn with a seed, for the drift tests: the same topic mix
twice gives two samples of one distribution; another mix is a shift."""

from __future__ import annotations

import random

TOPICS: dict[str, tuple[list[str], list[str], list[str]]] = {
    "sport": (
        [
            "The striker",
            "Our goalkeeper",
            "The coach",
            "The home team",
            "A young sprinter",
            "The tennis champion",
            "The cycling team",
            "The referee",
        ],
        [
            "scored in",
            "trained hard before",
            "celebrated after",
            "was injured during",
            "prepared tactics for",
            "lost focus in",
            "won the trophy at",
            "argued about",
        ],
        [
            "the final match",
            "the league season",
            "the marathon",
            "the penalty shootout",
            "the Olympic heats",
            "the cup semi-final",
            "the derby",
            "the world championship",
        ],
    ),
    "cooking": (
        [
            "The chef",
            "My grandmother",
            "The baker",
            "A home cook",
            "The pastry team",
            "The restaurant kitchen",
            "The food critic",
            "Our neighbour",
        ],
        ["simmered", "seasoned", "baked", "roasted", "whisked", "tasted", "plated", "grilled"],
        [
            "the tomato sauce with basil",
            "a loaf of sourdough bread",
            "the garlic butter",
            "a pot of lentil soup",
            "the chocolate cake",
            "fresh pasta with pesto",
            "the vegetable curry",
            "a tray of cinnamon rolls",
        ],
    ),
    "finance": (
        [
            "The central bank",
            "Investors",
            "The hedge fund",
            "The treasury",
            "Analysts",
            "The stock exchange",
            "The pension fund",
            "Bond traders",
        ],
        [
            "raised",
            "cut",
            "worried about",
            "priced in",
            "bet against",
            "reported",
            "hedged against",
            "revised",
        ],
        [
            "interest rates this quarter",
            "the inflation figures",
            "quarterly earnings",
            "the currency exchange rate",
            "government bond yields",
            "the mortgage market",
            "dividend payouts",
            "the budget deficit",
        ],
    ),
    "medicine": (
        [
            "The surgeon",
            "The nurse",
            "The clinical trial",
            "The cardiologist",
            "Patients",
            "The hospital ward",
            "The vaccine study",
            "The pharmacist",
        ],
        [
            "diagnosed",
            "treated",
            "monitored",
            "prescribed antibiotics for",
            "operated on",
            "screened for",
            "recovered from",
            "reported symptoms of",
        ],
        [
            "a heart arrhythmia",
            "the viral infection",
            "type 2 diabetes",
            "a fractured hip",
            "chronic migraines",
            "high blood pressure",
            "the respiratory illness",
            "a kidney disorder",
        ],
    ),
    "software": (
        [
            "The compiler",
            "Our backend service",
            "The database",
            "The engineer",
            "The web server",
            "The build pipeline",
            "The kernel",
            "The API gateway",
        ],
        [
            "crashed while parsing",
            "cached",
            "refactored",
            "deployed",
            "indexed",
            "timed out on",
            "logged an exception in",
            "rolled back",
        ],
        [
            "the JSON payload",
            "the release branch",
            "the SQL query",
            "the container image",
            "the memory allocator",
            "the HTTP request",
            "the unit tests",
            "the config file",
        ],
    ),
}


def texts(mix: dict[str, float], n: int, seed: int) -> list[str]:
    """``n`` sentences, each on a topic drawn with the weights in ``mix``."""
    rng = random.Random(seed)
    names = list(mix)
    weights = [mix[name] for name in names]
    out = []
    for _ in range(n):
        subjects, verbs, objects = TOPICS[rng.choices(names, weights)[0]]
        out.append(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}.")
    return out
