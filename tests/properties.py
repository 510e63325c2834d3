"""Hypothesis settings of the property tests written against surviving mutants (issue 19, `make mutate`)."""
from hypothesis import Phase, settings

# No shrinking: a failing example would be shrunk for many seconds (under `make mutate`, for every mutant a
# property kills, until mutmut calls it a timeout), and the examples here (seeds, small shapes, choices) read
# well as they come.
FAST = settings(max_examples=60, deadline=None, phases=(Phase.explicit, Phase.reuse, Phase.generate))
