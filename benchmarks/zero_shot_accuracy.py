"""Zero-shot classification accuracy of the default embedding model, per label template set and temperature.

Zero-shot classify embeds each label put into ``classify_label_template`` and scores a text against the labels
with softmax(cosine(text, label) / classify_temperature). This script measures, on the hand-labelled tasks in
benchmarks/zero_shot_set.json (sentiment, topics, emotion, intent), how the label template changes accuracy,
and which temperature gives the lowest mean negative log-likelihood (NLL) of the true label.

A candidate is a set of templates: one template is what the worker does today; with several, the label's vector
is the mean of the L2-normalised embeddings of the label under each template, renormalised. Templates are generic
(the same for every task), as the worker has one setting for every label set. Accuracy does not depend on the
temperature; NLL does. The table is sorted best first (overall accuracy, then NLL at the best temperature); the
best generic set is then compared with today's default text by text, every subset of the generic templates is
tried as an average (to see whether any beats the listed candidates), and the README's classify examples are
scored with the best generic setting and with today's default.

    HF_HUB_OFFLINE=1 python -m benchmarks.zero_shot_accuracy [--dataset PATH]
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from producer.settings import Settings
from workers.models.embed import PooledEmbedder
from workers.models.loading import pick_device

DATASET = Path(__file__).with_name("zero_shot_set.json")
TEMPERATURES = (0.01, 0.02, 0.03, 0.04, 0.05, 0.07, 0.1)
TODAY = ("{}",)
TODAY_TEMPERATURE = 0.03

GENERIC = ("This text is {}.", "This is {}.", "This example is about {}.", "A {} text.", "This text is about {}.",
           "It is {}.", "This is about {}.", "{}.")
# Review-specific wording: a reference point, never recommended (the worker's one template serves every label set).
NOT_GENERIC = ("The sentiment of this review is {}.",)
TEMPLATE_SETS: tuple[tuple[str, ...], ...] = (
    TODAY,
    *((template,) for template in GENERIC),
    *((template,) for template in NOT_GENERIC),
    ("This text is {}.", "This is {}.", "This example is about {}.", "A {} text."),
    ("{}", "This is {}.", "This text is about {}."),
    ("This text is {}.", "This text is about {}."),
    ("This is {}.", "This is about {}."),
    ("This text is {}.", "This is {}.", "This text is about {}.", "This is about {}."),
    ("{}", "This text is {}.", "This is {}.", "This example is about {}.", "A {} text."),
    ("This text is {}.", "This is {}.", "This example is about {}.", "A {} text.", "This text is about {}.",
     "It is {}."),
    GENERIC,
)

# Every classify example in README.md (and producer/demo.py, whose output the README shows): text, labels, truth;
# plus the user's report ("Terrible service, never again") and the longer striker sentence.
README_EXAMPLES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("The match went to extra time and the home side scored the winner.", ("sports", "finance", "cooking"), "sports"),
    ("Shares slid after the central bank raised interest rates.", ("sports", "finance", "cooking"), "finance"),
    ("The striker scored twice.", ("sports", "finance", "cooking"), "sports"),
    ("The striker scored twice in the second half.", ("sports", "finance", "cooking"), "sports"),
    ("I loved it", ("positive", "negative"), "positive"),
    ("awful", ("positive", "negative"), "negative"),
    ("Terrible service, never again", ("positive", "negative"), "negative"),
)


@dataclass(frozen=True)
class Task:
    labels: list[str]
    texts: list[str]
    truths: list[int]


@dataclass(frozen=True)
class Outcome:
    """One template set: per task, the cosine matrix (texts x labels) and each text's true label."""

    templates: tuple[str, ...]
    cosines: dict[str, torch.Tensor]
    truths: dict[str, torch.Tensor]

    def accuracy(self, task: str) -> float:
        return float((self.cosines[task].argmax(-1) == self.truths[task]).float().mean())

    def overall(self) -> float:
        correct = sum(int((self.cosines[t].argmax(-1) == self.truths[t]).sum()) for t in self.cosines)
        return correct / sum(len(v) for v in self.truths.values())

    def macro(self) -> float:
        return sum(self.accuracy(t) for t in self.cosines) / len(self.cosines)

    def _true_log_probs(self, temperature: float) -> torch.Tensor:
        return torch.cat([(self.cosines[t] / temperature).log_softmax(-1).gather(1, self.truths[t][:, None])[:, 0]
                          for t in self.cosines])

    def nll(self, temperature: float) -> float:
        return -float(self._true_log_probs(temperature).mean())

    def mean_top_score(self, temperature: float) -> float:
        return float(torch.cat([(c / temperature).softmax(-1).max(-1).values for c in self.cosines.values()]).mean())

    def best_temperature(self) -> float:
        return min(TEMPERATURES, key=self.nll)

    def generic(self) -> bool:
        return not set(self.templates) & set(NOT_GENERIC)

    def correct(self) -> torch.Tensor:
        """One bool per text, all tasks in order: whether the top label is the true one."""
        return torch.cat([self.cosines[t].argmax(-1) == self.truths[t] for t in self.cosines])

    def rank_key(self) -> tuple[float, float]:
        return -self.overall(), self.nll(self.best_temperature())


def load_tasks(path: Path) -> dict[str, Task]:
    raw = json.loads(path.read_text(encoding="utf-8"))
    tasks: dict[str, Task] = {}
    for name, task in raw.items():
        labels = [str(label) for label in task["labels"]]
        if len(set(labels)) != len(labels):
            raise ValueError(f"{path}: task {name!r} repeats a label")
        texts, truths = [], []
        for text, label in task["examples"]:
            if label not in labels:
                raise ValueError(f"{path}: task {name!r}: {label!r} is not one of {labels}")
            texts.append(str(text))
            truths.append(labels.index(label))
        tasks[name] = Task(labels, texts, truths)
    return tasks


class LabelVectors:
    """Label vectors per template set, each distinct label text embedded once."""

    def __init__(self, embedder: PooledEmbedder) -> None:
        self.embedder = embedder
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, labels: Sequence[str], templates: tuple[str, ...]) -> torch.Tensor:
        """One unit row per label: the renormalised mean over templates of the unit embedding of the label text."""
        wanted = [template.format(label) for template in templates for label in labels]
        missing = sorted({text for text in wanted if text not in self._cache})
        if missing:
            self._cache.update(zip(missing, self.embedder.embed(missing, normalize=True), strict=True))
        per_template = torch.stack([self._cache[text] for text in wanted]).view(len(templates), len(labels), -1)
        return torch.nn.functional.normalize(per_template.mean(0), dim=-1)


def show(templates: tuple[str, ...]) -> str:
    return " + ".join(repr(t) for t in templates)


def evaluate(templates: tuple[str, ...], tasks: dict[str, Task], texts: dict[str, torch.Tensor],
             vectors: LabelVectors) -> Outcome:
    cosines = {name: texts[name] @ vectors(task.labels, templates).T for name, task in tasks.items()}
    return Outcome(templates, cosines, {name: torch.tensor(task.truths) for name, task in tasks.items()})


def print_table(outcomes: list[Outcome], tasks: dict[str, Task]) -> None:
    head = ["#", *(name[:9] for name in tasks), "overall", "macro", *(f"NLL@{t:g}" for t in TEMPERATURES),
            "best T", "top@T"]
    print(" ".join(f"{h:>9}" for h in head))
    for rank, outcome in enumerate(outcomes, 1):
        best = outcome.best_temperature()
        cells = [f"{rank:>9}", *(f"{outcome.accuracy(name):>9.3f}" for name in tasks),
                 f"{outcome.overall():>9.3f}", f"{outcome.macro():>9.3f}",
                 *(f"{outcome.nll(t):>9.3f}" for t in TEMPERATURES), f"{best:>9g}",
                 f"{outcome.mean_top_score(best):>9.3f}"]
        print(" ".join(cells))
    print("\ntemplate sets by rank:")
    for rank, outcome in enumerate(outcomes, 1):
        print(f"  {rank:>2}  {show(outcome.templates)}{'' if outcome.generic() else '  (not generic)'}")


def print_errors(outcome: Outcome, tasks: dict[str, Task], temperature: float) -> None:
    for name, task in tasks.items():
        probs = (outcome.cosines[name] / temperature).softmax(-1)
        for text, truth, row in zip(task.texts, task.truths, probs, strict=True):
            top = int(row.argmax())
            if top != truth:
                print(f"  [{name}] {text!r}: {task.labels[top]} {float(row[top]):.3f} "
                      f"(true: {task.labels[truth]} {float(row[truth]):.3f})")


def print_readme(embedder: PooledEmbedder, vectors: LabelVectors, templates: tuple[str, ...],
                 temperature: float) -> int:
    """Prints each README example's scores; returns how many come out wrong."""
    wrong = 0
    for text, labels, truth in README_EXAMPLES:
        scores = (embedder.embed([text], normalize=True) @ vectors(labels, templates).T / temperature).softmax(-1)[0]
        ranked = sorted(zip(labels, scores.tolist(), strict=True), key=lambda pair: -pair[1])
        ok = ranked[0][0] == truth
        wrong += not ok
        shown = ", ".join(f"{label} {score:.3f}" for label, score in ranked)
        print(f"  {'ok   ' if ok else 'WRONG'} {text!r} {list(labels)} -> {shown}")
    return wrong


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dataset", type=Path, default=DATASET)
    args = parser.parse_args()
    tasks = load_tasks(args.dataset)

    settings = Settings()
    alias = settings.models.default_alias("embed")
    if alias is None:
        raise SystemExit("no embedding model is configured")
    entry = settings.models.embed[alias]
    with torch.inference_mode():
        embedder = PooledEmbedder.load(alias, entry, pick_device("cpu"))
        vectors = LabelVectors(embedder)
        texts = {name: embedder.embed(task.texts, normalize=True) for name, task in tasks.items()}
        outcomes = sorted((evaluate(templates, tasks, texts, vectors) for templates in TEMPLATE_SETS),
                          key=Outcome.rank_key)

        sizes = ", ".join(f"{name} {len(task.texts)} texts / {len(task.labels)} labels" for name, task in tasks.items())
        print(f"model {alias} ({entry.source}); {args.dataset.name}: {sizes}")
        print("accuracy per task, overall (all texts), macro (mean of tasks); mean NLL of the true label per T; "
              "top@T: mean top score at the best T\n")
        print_table(outcomes, tasks)

        best = next(o for o in outcomes if o.generic())
        best_t = best.best_temperature()
        today = next(o for o in outcomes if o.templates == TODAY)
        print(f"\nbest generic: {show(best.templates)} at T={best_t:g}: overall {best.overall():.3f}, "
              + ", ".join(f"{name} {best.accuracy(name):.3f}" for name in tasks)
              + f"; NLL {best.nll(best_t):.3f}, mean top score {best.mean_top_score(best_t):.3f}")
        print(f"today: {show(TODAY)} at T={TODAY_TEMPERATURE:g}: overall {today.overall():.3f}, "
              + ", ".join(f"{name} {today.accuracy(name):.3f}" for name in tasks)
              + f"; NLL {today.nll(TODAY_TEMPERATURE):.3f} (best T for it: {today.best_temperature():g})")
        only_best = int((best.correct() & ~today.correct()).sum())
        only_today = int((today.correct() & ~best.correct()).sum())
        print(f"text by text: {only_best} right only with the best, {only_today} right only with today's "
              f"(of {len(best.correct())})")

        pool = (*TODAY, *GENERIC)
        subsets = sorted((evaluate(subset, tasks, texts, vectors) for k in range(1, len(pool) + 1)
                          for subset in itertools.combinations(pool, k)), key=Outcome.rank_key)
        mean = sum(o.overall() for o in subsets) / len(subsets)
        print(f"\nevery subset of {len(pool)} generic templates, averaged ({len(subsets)}; mean overall "
              f"{mean:.3f}), top 10 (chosen after the fact on this set, so optimistic):")
        for outcome in subsets[:10]:
            print(f"  {outcome.overall():.3f} NLL@{outcome.best_temperature():g} "
                  f"{outcome.nll(outcome.best_temperature()):.3f}  {show(outcome.templates)}")

        print(f"\nmisclassified with the best generic setting ({show(best.templates)}, T={best_t:g}):")
        print_errors(best, tasks, best_t)
        print(f"\nREADME classify examples, best generic setting ({show(best.templates)}, T={best_t:g}):")
        wrong = print_readme(embedder, vectors, best.templates, best_t)
        print(f"  {wrong} of {len(README_EXAMPLES)} wrong")
        print(f"\nREADME classify examples, today ({show(TODAY)}, T={TODAY_TEMPERATURE:g}):")
        wrong = print_readme(embedder, vectors, TODAY, TODAY_TEMPERATURE)
        print(f"  {wrong} of {len(README_EXAMPLES)} wrong")


if __name__ == "__main__":
    main()
