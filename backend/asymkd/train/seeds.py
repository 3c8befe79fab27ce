"""Named seed streams: each random use of a run draws from a seed of its own, derived from
the run's seed and the use's name (and keys such as a fold number).

Offsets such as `seed + 7` collide (seed 94's +7 is seed 0's +101); a hash of the name keeps
every stream apart from the others and from the run's seed itself, which drives the data
splits (validation, folds, per-class limits) and the final teacher.
"""

from __future__ import annotations

import hashlib

import numpy as np

# The named uses of the run's seed; a name's stream never changes once released (it would
# change the results of every run that uses it).
MATCHER = "matcher"
STUDENT = "student"            # the distilled student and the baseline alike: the same start
TEACHER_FOLD = "teacher-fold"  # keyed by the fold number
PAIRING = "pairing"            # the first assignment (drawn by `random` pairing)
REPAIR = "repair"              # the re-pairings (drawn by `random` pairing)


def stream(base: int, name: str, *keys: int) -> int:
    """The seed of use `name` (with `keys`) of the run seed `base`: 63 bits of numpy's
    SeedSequence over the base seed, a hash of the name and the keys (non-negative)."""
    tag = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
    state = np.random.SeedSequence([int(base), tag, *(int(k) for k in keys)]).generate_state(1, np.uint64)
    return int(state[0]) >> 1  # torch and numpy both take a non-negative int64
