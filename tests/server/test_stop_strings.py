"""Stop strings over a text stream, checked against str.find on the whole text for every way of
splitting the text into deltas."""
from __future__ import annotations

import random

import pytest

from torchchat.server.stop_strings import StopStrings

TEXT = 'Once upon a time, there was a little girl named Lily. She said, "Lily, let\'s go!" The end.'


def run(deltas, stops):
    f = StopStrings(stops)
    out = "".join(f.feed(d) for d in deltas)
    return out + f.flush(), f.stopped


def expected(text, stops):
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def random_splits(text, rng, n):
    for _ in range(n):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, min(30, len(text) - 1))))
        yield [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


@pytest.mark.parametrize("stops", [
    ["Lily"],
    ["girl named"],
    [". She"],
    ['"'],
    ["The end."],
    ["zebra"],
    ["Lil!", "little"],  # a partial match of one stop string, then a real match of another
    ["time, there", "upon"],  # the earliest occurrence wins, whichever string it is
    ["ee", "e"],
    ["let's go!\" The end.!"],  # longer than what remains: never completes
])
def test_every_split_gives_the_text_before_the_first_stop(stops):
    rng = random.Random(0)
    want = expected(TEXT, stops)
    for deltas in [[TEXT], list(TEXT), *random_splits(TEXT, rng, 200)]:
        assert run(deltas, stops) == want, deltas


def test_text_that_may_start_a_stop_string_is_held_back():
    f = StopStrings(["world peace"])
    assert f.feed("Hello wor") == "Hello "
    assert f.feed("ld") == ""  # "world" is still a prefix of "world peace"
    assert f.feed("!") == "world!"  # no longer a prefix: released
    assert f.feed(" world pe") == " "
    assert f.flush() == "world pe"  # generation ended without completing the stop string


def test_nothing_after_a_stop():
    f = StopStrings(["stop"])
    assert f.feed("go stop go") == "go "
    assert f.stopped and f.feed("more") == "" and f.flush() == ""


def test_no_stop_strings_pass_everything_through():
    f = StopStrings([])
    assert [f.feed(d) for d in ("a", "b", "")] == ["a", "b", ""] and f.flush() == ""
