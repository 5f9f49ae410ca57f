"""Write rxf's bundled demo data: short made-up product and service reviews, labelled
1 (positive) or 0 (negative). Written for this project from the templates below; it is
a demo for the quickstart, not a benchmark.

Labels depend on negation and on which half of a contrast ("..., but ...") carries the
verdict, so a bag of words does not solve it outright.

    python scripts/make_demo_data.py   # rewrites src/rxf/demo_data/{train,dev}.tsv
"""

import random
from pathlib import Path

SUBJECTS = [
    "the blender", "this kettle", "the hotel room", "the delivery", "our waiter", "the tent", "this laptop",
    "the headphones", "the bike shop", "the train ride", "this novel", "the museum tour", "the pizza",
    "the phone case", "the haircut", "the yoga class", "this backpack", "the rental car", "the coffee",
    "the repair service", "the garden hose", "this jacket", "the dentist", "the concert", "the app update",
    "the mattress", "the bakery", "the ferry", "this board game", "the printer", "the sushi bar", "the gym",
]
GOOD = [
    "works perfectly", "was a delight", "exceeded my expectations", "is worth every penny", "made my day",
    "was friendly and quick", "feels sturdy", "is wonderful", "arrived early", "was spotless",
    "tastes fantastic", "is a joy to use", "was excellent", "holds up well", "was comfortable",
    "is great value", "was helpful", "looks beautiful", "is reliable", "was impressive",
]
BAD = [
    "broke after a week", "was a waste of money", "fell apart", "is overpriced", "ruined my evening",
    "was rude and slow", "feels flimsy", "is awful", "arrived late", "was filthy", "tastes stale",
    "is a pain to use", "was disappointing", "leaks constantly", "was uncomfortable", "is poor value",
    "was useless", "looks cheap", "is unreliable", "was a letdown",
]
NEGATED_GOOD = ["was not great", "is not worth it", "was far from good", "is not reliable", "was never comfortable"]
NEGATED_BAD = ["was not bad at all", "is not overpriced", "never let me down", "was not a waste", "is hardly flimsy"]
OPENERS = ["Honestly,", "Overall,", "I must say", "In short,", "To be fair,", "Sadly,", "Happily,", ""]


def sentence(rng: random.Random, subjects, good, bad) -> tuple[str, int]:
    subject = rng.choice(subjects)
    kind = rng.random()
    if kind < 0.45:
        label = rng.random() < 0.5
        phrase = rng.choice(good if label else bad)
        text = f"{rng.choice(OPENERS)} {subject} {phrase}."
    elif kind < 0.7:
        label = rng.random() < 0.5
        phrase = rng.choice(NEGATED_BAD if label else NEGATED_GOOD)
        text = f"{rng.choice(OPENERS)} {subject} {phrase}."
    else:  # a contrast: the clause after "but" carries the verdict
        label = rng.random() < 0.5
        first = rng.choice(bad if label else good)
        second = rng.choice(good if label else bad)
        text = f"{subject.capitalize()} {first}, but in the end it {second}."
    return " ".join(text.split()).strip().capitalize(), int(label)


def write(path: Path, rows) -> None:
    path.write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows))


def main() -> None:
    rng = random.Random(2021)
    out = Path(__file__).resolve().parents[1] / "src" / "rxf" / "demo_data"
    out.mkdir(parents=True, exist_ok=True)
    # Dev uses subjects and phrases held out of training.
    train_subjects, dev_subjects = SUBJECTS[:24], SUBJECTS[24:]
    train_good, dev_good, train_bad, dev_bad = GOOD[:15], GOOD[15:], BAD[:15], BAD[15:]
    train = {sentence(rng, train_subjects, train_good, train_bad) for _ in range(900)}
    dev = {sentence(rng, dev_subjects, dev_good, dev_bad) for _ in range(300)}
    train, dev = sorted(train)[:640], sorted(dev - train)[:200]
    rng.shuffle(train)
    rng.shuffle(dev)
    write(out / "train.tsv", train)
    write(out / "dev.tsv", dev)
    print(f"wrote {len(train)} train and {len(dev)} dev rows to {out}")


if __name__ == "__main__":
    main()
