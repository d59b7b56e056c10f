"""`parallm serve` whose engine step raises once a request arrives: a stand-in for a device fault
or a model bug that kills the worker thread (fault injection for test_engine_death.py)."""
import sys

from parallm.cli import main
from parallm.engine.engine import Engine


def failing_step(self):
    raise RuntimeError("simulated device failure")


Engine.step = failing_step
sys.exit(main())
