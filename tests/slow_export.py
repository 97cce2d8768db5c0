"""scripts/export_checkpoint.py with the save held open for SLOW_SAVE_SECONDS seconds after the model's files are
written, so that a test can kill an export in the middle of it.

    SLOW_SAVE_SECONDS=60 python tests/slow_export.py CHECKPOINT OUT_DIR

The delay sits in transformers' save_pretrained (which writes into the export's temporary folder), so the
export's own code, from the temporary folder to the rename that puts it in place, runs unchanged.
"""

import os
import runpy
import sys
import time
from pathlib import Path

import transformers

_save_pretrained = transformers.PreTrainedModel.save_pretrained


def slow_save_pretrained(self, *args, **kwargs):
    result = _save_pretrained(self, *args, **kwargs)
    time.sleep(float(os.environ["SLOW_SAVE_SECONDS"]))
    return result


transformers.PreTrainedModel.save_pretrained = slow_save_pretrained
script = Path(__file__).resolve().parent.parent / "scripts" / "export_checkpoint.py"
sys.argv[0] = str(script)
runpy.run_path(str(script), run_name="__main__")
