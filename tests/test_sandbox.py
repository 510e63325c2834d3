"""The decoder sandbox: a native crash (SIGABRT, as gdcm does on some corrupt files) fails one call."""
from __future__ import annotations

import os

import pytest

from pneumomap.stages.sandbox import DecoderCrashed, Sandbox


def test_a_crash_fails_one_call_and_the_next_call_works():
    box = Sandbox(timeout=60)
    try:
        assert box.call(divmod, 7, 2) == (3, 1)
        with pytest.raises(DecoderCrashed, match="signal 6"):
            box.call(os.abort)
        with pytest.raises(ZeroDivisionError):
            box.call(divmod, 1, 0)  # an ordinary error comes back as itself
        assert box.call(divmod, 9, 4) == (2, 1)  # a fresh child took over
    finally:
        box.close()


def test_a_hung_decoder_is_stopped():
    import time

    box = Sandbox(timeout=1)
    try:
        with pytest.raises(DecoderCrashed, match="more than 1 s"):
            box.call(time.sleep, 30)
        assert box.call(divmod, 5, 5) == (1, 0)
    finally:
        box.close()
