#!/usr/bin/env python3
"""Cloze questions from plain text, as a multiple-choice task file for `huginn eval` and lm-eval.

Each question is a stretch of the text ending just before a word, that word as the gold choice
and other words of the text (of similar length, drawn with a fixed seed) as the distractors;
choices carry their leading space, so the task is scored with no delimiter between context and
choice. Questions come from the last part of the text (--from, a fraction), which a model trained
on the start of the same file has not seen.

    scripts/make-cloze.py ../shared/data/shakespeare_1mb.txt tasks/cloze.jsonl --questions 200
"""

import argparse
import json
import random
import re


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("text")
    parser.add_argument("out")
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--choices", type=int, default=4)
    parser.add_argument("--context-chars", type=int, default=48, help="most characters of context")
    parser.add_argument("--from", dest="start", type=float, default=0.9, help="where questions start, a fraction of the text")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not (0 <= args.start < 1 and args.questions > 0 and args.choices >= 2 and args.context_chars >= 8):
        parser.error("--from in [0, 1), --questions >= 1, --choices >= 2, --context-chars >= 8")

    text = open(args.text, encoding="utf-8").read()
    words = [m for m in re.finditer(r"[A-Za-z]+", text) if m.start() >= len(text) * args.start]
    vocabulary = sorted({m.group() for m in words})
    by_length = {}
    for word in vocabulary:
        by_length.setdefault(len(word), []).append(word)
    rng = random.Random(args.seed)
    with open(args.out, "x", encoding="utf-8") as out:  # never overwrites a task file
        written = 0
        for match in rng.sample(words, len(words)):
            if written == args.questions:
                break
            gold = match.group()
            # The context: whole words before the gold one, on one line, ending in its space.
            start = max(0, match.start() - args.context_chars)
            context = text[start : match.start()]
            if "\n" in context:
                context = context[context.rfind("\n") + 1 :]
            context = context[context.find(" ") + 1 :] if start > 0 else context
            if not context.endswith(" ") or len(context.strip()) < 8:
                continue
            pool = [w for n in (len(gold) - 1, len(gold), len(gold) + 1) for w in by_length.get(n, []) if w.lower() != gold.lower()]
            if len(pool) < args.choices - 1:
                continue
            choices = [gold] + rng.sample(pool, args.choices - 1)
            rng.shuffle(choices)
            line = {"context": context.rstrip(" "), "choices": [" " + c for c in choices], "gold": choices.index(gold)}
            out.write(json.dumps(line) + "\n")
            written += 1
    if written < args.questions:
        raise SystemExit(f"only {written} questions could be made from {args.text}")


if __name__ == "__main__":
    main()
