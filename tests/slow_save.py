"""scripts/pretrain.py with every checkpoint save held open for SLOW_SAVE_SECONDS seconds after its files are
written, so that a test can kill or signal a run in the middle of a save.

    SLOW_SAVE_SECONDS=1.5 accelerate launch tests/slow_save.py [trainer args]

The delay sits in Accelerate's save_state (which writes into the checkpoint's temporary directory), so the
trainer's own save code, from the temporary directory to the rename that commits it, runs unchanged.
"""

import os
import runpy
import sys
import time
from pathlib import Path

import accelerate

_save_state = accelerate.Accelerator.save_state


def slow_save_state(self, *args, **kwargs):
    result = _save_state(self, *args, **kwargs)
    time.sleep(float(os.environ["SLOW_SAVE_SECONDS"]))
    return result


accelerate.Accelerator.save_state = slow_save_state
script = Path(__file__).resolve().parent.parent / "scripts" / "pretrain.py"
sys.argv[0] = str(script)
runpy.run_path(str(script), run_name="__main__")
