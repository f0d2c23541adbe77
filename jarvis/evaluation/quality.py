"""A small dialogue-quality check: questions with answers a program can verify
(capitals, arithmetic, unit conversions, facts from the household system prompt in
``jarvis/evaluation/data/home_system_prompt.txt``), scored by keyword or number match.

It is a baseline to compare models and backends by, not a test of intelligence: a
reply counts as right when it contains one of the accepted answers (as a whole word
or number; "fifty-six", "fifty six" and "56" are all accepted where listed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Question:
    """One question and the answers that count as right."""

    category: str
    """capital, arithmetic, units or household."""
    text: str
    accepted: tuple[str, ...]
    """Any of these, matched as whole words in the normalized reply."""


QUESTIONS: tuple[Question, ...] = (
    Question("capital", "What is the capital of France?", ("paris",)),
    Question("capital", "What is the capital of Japan?", ("tokyo",)),
    Question("capital", "What is the capital of Italy?", ("rome",)),
    Question("capital", "What is the capital of Germany?", ("berlin",)),
    Question("capital", "What is the capital of Spain?", ("madrid",)),
    Question("arithmetic", "What is seven times eight?", ("56", "fifty six")),
    Question("arithmetic", "What is fifteen plus twenty-seven?", ("42", "forty two")),
    Question("arithmetic", "What is one hundred minus thirty-seven?", ("63", "sixty three")),
    Question("arithmetic", "What is half of fifty?", ("25", "twenty five")),
    Question("units", "How many metres are in a kilometre?",
             ("1000", "one thousand", "a thousand")),
    Question("units", "How many minutes are in two hours?",
             ("120", "one hundred and twenty", "a hundred and twenty", "hundred twenty")),
    Question("units", "How many grams are in a kilogram?",
             ("1000", "one thousand", "a thousand")),
    Question("units", "How many centimetres are in a metre?",
             ("100", "one hundred", "a hundred")),
    Question("household", "What is the name of the family's dog?", ("biscuit",)),
    Question("household", "How old is Leo?", ("6", "six")),
    Question("household", "What is Mia allergic to?", ("peanut", "peanuts")),
    Question("household", "What is the name of the cleaner?", ("rosa",)),
    Question("household", "On which day does the cleaner come?", ("wednesday", "wednesdays")),
    Question("household", "Who keeps a spare key to the house?", ("tom", "priya")),
    Question("household", "What time does Biscuit get fed in the evening?",
             ("6", "six", "18", "1800", "18 00", "6 pm", "6pm")),
)
"""Twenty questions, asked in this order in one conversation."""

_DROP = re.compile(r"[^a-z0-9 ]+")


def normalize(text: str) -> str:
    """Lower case, hyphens and punctuation as spaces, thousands separators dropped
    ("1,000" -> "1000", "fifty-six" -> "fifty six", "6:00" -> "6 00")."""
    text = text.lower().replace("’", "'")
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    text = text.replace("'s", "")
    return " ".join(_DROP.sub(" ", text).split())


def is_correct(question: Question, reply: str) -> bool:
    """Whether ``reply`` contains one of ``question``'s accepted answers as whole words."""
    padded = f" {normalize(reply)} "
    return any(f" {normalize(answer)} " in padded for answer in question.accepted)


@dataclass(frozen=True)
class Score:
    """Right answers per category and overall."""

    right: int
    total: int
    by_category: dict[str, tuple[int, int]]

    @property
    def share(self) -> float:
        return self.right / self.total if self.total else 0.0


def score(questions: tuple[Question, ...] | list[Question], replies: list[str]) -> Score:
    """Score ``replies`` (one per question, in order)."""
    if len(questions) != len(replies):
        raise ValueError(f"{len(replies)} replies for {len(questions)} questions")
    by: dict[str, tuple[int, int]] = {}
    right = 0
    for question, reply in zip(questions, replies, strict=True):
        ok = is_correct(question, reply)
        right += ok
        r, t = by.get(question.category, (0, 0))
        by[question.category] = (r + ok, t + 1)
    return Score(right, len(questions), by)
