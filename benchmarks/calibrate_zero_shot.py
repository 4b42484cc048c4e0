"""Pick classify_temperature for zero-shot classification by calibration, not by taste.

On a small hand-labelled set (four topics, plus sentiment), scores = softmax(cosine / T) over the label
names. For each T we report accuracy (the same for every T), mean negative log-likelihood of the true
label, mean top score and the gap between mean top score and accuracy. "Confident but honest" is the T with the lowest
NLL: the top score then matches how often the top label is right.

    python benchmarks/calibrate_zero_shot.py
"""

from __future__ import annotations

import math

import torch

from producer.settings import Settings
from workers.models.embed import PooledEmbedder
from workers.models.loading import pick_device

SETS: dict[str, tuple[list[str], list[tuple[str, str]]]] = {
    "topics": (["sports", "finance", "cooking", "technology"], [
        ("The striker scored twice in the second half.", "sports"),
        ("She won the marathon in record time.", "sports"),
        ("The coach was sacked after five straight defeats.", "sports"),
        ("Tickets for the final sold out in minutes.", "sports"),
        ("The tennis player withdrew with a wrist injury.", "sports"),
        ("Stocks fell sharply after the earnings report.", "finance"),
        ("The central bank kept interest rates unchanged.", "finance"),
        ("Investors moved their savings into government bonds.", "finance"),
        ("The company's quarterly revenue beat expectations.", "finance"),
        ("Mortgage costs rose for the third month in a row.", "finance"),
        ("Simmer the sauce until it thickens, then add basil.", "cooking"),
        ("Knead the dough for ten minutes and let it rise.", "cooking"),
        ("Roast the vegetables with olive oil and garlic.", "cooking"),
        ("This soup recipe needs only five ingredients.", "cooking"),
        ("Whisk the eggs with sugar until pale.", "cooking"),
        ("The new phone has a faster chip and a better camera.", "technology"),
        ("Update your browser to fix the security flaw.", "technology"),
        ("The startup released an open-source database.", "technology"),
        ("Engineers rewrote the app to cut its memory use.", "technology"),
        ("The laptop's battery lasts fourteen hours.", "technology"),
    ]),
    "sentiment": (["positive", "negative"], [
        ("I absolutely loved this film, what a joy.", "positive"),
        ("The service was wonderful and the staff were kind.", "positive"),
        ("Best purchase I've made all year.", "positive"),
        ("A delightful, heart-warming story.", "positive"),
        ("Great value and it works perfectly.", "positive"),
        ("Terrible food and rude waiters.", "negative"),
        ("The product broke after two days.", "negative"),
        ("I regret buying this; a complete waste of money.", "negative"),
        ("The plot was dull and the acting awful.", "negative"),
        ("Worst customer support I have ever dealt with.", "negative"),
    ]),
}
TEMPERATURES = [0.01, 0.02, 0.03, 0.04, 0.05, 0.07, 0.1, 0.2]


def main() -> None:
    settings = Settings()
    alias = settings.models.default_alias("embed")
    assert alias is not None
    embedder = PooledEmbedder.load(alias, settings.models.embed[alias], pick_device("cpu"))
    sims: list[torch.Tensor] = []
    truths: list[int] = []
    with torch.inference_mode():
        for labels, examples in SETS.values():
            texts = embedder.embed([t for t, _ in examples], normalize=True)
            label_vectors = embedder.embed(labels, normalize=True)
            sims.extend(list(texts @ label_vectors.T))
            truths.extend(labels.index(label) for _, label in examples)
    print(f"{'T':>6} {'accuracy':>9} {'NLL':>7} {'mean top score':>15} {'|top-acc|':>9}")
    for temperature in TEMPERATURES:
        nll = correct = conf = ece_num = 0.0
        for row, truth in zip(sims, truths, strict=True):
            probs = (row / temperature).softmax(-1)
            nll -= math.log(float(probs[truth]) + 1e-12)
            top = int(probs.argmax())
            correct += top == truth
            conf += float(probs[top])
            ece_num += float(probs[top]) - (top == truth)
        n = len(truths)
        print(f"{temperature:>6} {correct / n:>9.2f} {nll / n:>7.3f} {conf / n:>15.3f} {abs(ece_num) / n:>9.3f}")


if __name__ == "__main__":
    main()
