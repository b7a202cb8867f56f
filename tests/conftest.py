"""Hypothesis profiles for the property tests (tests/test_properties_*.py), and one thread for them.

    ci    the default: a bounded number of examples, derandomized (the same examples on every
          run and every machine), no example database, no deadline (shared CPUs jitter)
    deep  500 examples a test (ci: 30), freshly random each run, for a local search (~3 minutes)

Choose one with the environment variable HYPOTHESIS_PROFILE, or with hypothesis' own pytest
option, which wins over the variable:

    HYPOTHESIS_PROFILE=deep python -m pytest tests/test_properties_*.py -p no:cacheprovider
    python -m pytest tests/test_properties_*.py -p no:cacheprovider --hypothesis-profile=deep

A counter-example either profile finds is kept as an explicit @example (or a named test) on
the property, so the ci profile replays it on every run.
"""

import os
import tempfile

import pytest
from hypothesis import settings

# database=None keeps hypothesis' example database out of the working tree, but hypothesis also
# caches the constants it finds in our source files, under .hypothesis/constants/ by default
# (hypothesis 6.170 does, whatever the database); keep that cache in the temp folder too.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tempfile.gettempdir(), "lora_edu-hypothesis"))

settings.register_profile("ci", max_examples=30, derandomize=True, database=None, deadline=None,
                          print_blob=True)
settings.register_profile("deep", max_examples=500, derandomize=False, database=None, deadline=None,
                          print_blob=True)  # print_blob: a failure prints the blob that replays it
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread_for_property_tests(request):
    """The property tests run thousands of ops on tensors of a few dozen numbers. Handing each
    to a second thread costs more than the op, and on a busy 2-core machine 50 to 100 times more
    (a TinyModel forward: 80 ms on two threads, 1 ms on one). Other test modules are left alone."""
    if not request.module.__name__.startswith("test_properties_"):
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
