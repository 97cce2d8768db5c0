"""scripts/pretrain.py with Accelerate's FSDP2 and DeepSpeed engines on CPU processes, for the tests.

    ACCELERATE_USE_CPU=1 accelerate launch --config_file configs/accelerate/fsdp2.yaml \
        --num_processes 2 tests/cpu_engines.py [trainer args]

torch's FSDP2 and DeepSpeed both run on gloo, but Accelerate picks those engines only for GPU-like
devices: on CPU, AcceleratorState keeps MULTI_CPU and ignores the plugin it was given. This makes
the one choice Accelerate would make on a GPU (the engine, from the plugin the launcher configured)
and then runs the real entry point unchanged: the loop, prepare, save and load are all the real ones.
"""

import runpy
import sys
from pathlib import Path

import accelerate.state
from accelerate.utils import DistributedType

_original_init = accelerate.state.AcceleratorState.__init__


def _init_choosing_the_engine(self, *args, fsdp_plugin=None, deepspeed_plugin=None, **kwargs):
    first = not accelerate.state.AcceleratorState._shared_state  # later calls only read the shared state
    _original_init(self, *args, fsdp_plugin=fsdp_plugin, deepspeed_plugin=deepspeed_plugin, **kwargs)
    if not first or self.distributed_type != DistributedType.MULTI_CPU:
        return
    if fsdp_plugin is not None:  # as AcceleratorState does for MULTI_GPU
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
    elif deepspeed_plugin is not None:  # as AcceleratorState does when not on CPU
        self.distributed_type = DistributedType.DEEPSPEED
        deepspeed_plugin.set_mixed_precision(self._mixed_precision)
        deepspeed_plugin.select(_from_accelerator_state=True)
        self.deepspeed_plugins = deepspeed_plugin
    accelerate.state.PartialState._shared_state["distributed_type"] = self.distributed_type


accelerate.state.AcceleratorState.__init__ = _init_choosing_the_engine
try:  # DeepSpeed compiles a shared-memory all-reduce for CPU processes on first use (30 s); gloo's serves
    import deepspeed.comm.torch
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # (deepspeed.comm.torch is torch itself)
except ImportError:
    pass
script = Path(__file__).resolve().parent.parent / "scripts" / "pretrain.py"
sys.argv[0] = str(script)
runpy.run_path(str(script), run_name="__main__")
