"""The matcher says when its pairing would be close to random."""

from __future__ import annotations


def test_a_matcher_near_chance_is_said_to_be():
    import io

    from asymkd.events import Events
    from asymkd.train.matcher import warn_near_chance
    stream = io.StringIO()
    warn_near_chance(0.111, 10, Events(stream=stream, progress_bars=False))  # one in ten: chance
    assert "near chance" in stream.getvalue()
    quiet = io.StringIO()
    warn_near_chance(0.68, 10, Events(stream=quiet, progress_bars=False))
    warn_near_chance(0.9, 2, Events(stream=quiet, progress_bars=False))
    assert quiet.getvalue() == ""
