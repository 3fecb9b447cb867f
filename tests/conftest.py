"""Fixtures shared by the test folders."""
import pytest


@pytest.fixture
def sim():
    """The simulated GPU (COURSE_DEVICE=sim, course_lib.simdevice) for one test, turned off after it."""
    from course_lib import runtime, simdevice
    dev = runtime.device("sim")
    try:
        yield dev
    finally:
        simdevice.disable()
