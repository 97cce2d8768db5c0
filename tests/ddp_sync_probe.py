"""Run under 2 processes (torchrun): records, after each micro-batch's backward, whether ranks' gradients agree.

Used by the `ddp_probe` fixture: `torchrun --nproc_per_node 2 tests/ddp_sync_probe.py REPO OUT`. One optimizer
step as configured (train.sync_each_batch: false), then one with train.sync_each_batch turned on (as
build_accelerator sets it: test_ddp_sync.py checks that wiring). Prints one JSON line from rank 0:
{"false": [[micro-batch index, grads equal across ranks], ...], "true": [...]}.

Then one step over ragged micro-batches with the noise scale measured; rank 0 saves to OUT the weights before
it, every rank's micro-batches, each rank's (b, |G_b|^2), the step's gradient norm and the estimate, for
test_noise_scale.py to check against a computation of its own.

Last, train.micro_batch_size: auto with rank 1's trials made to run out of memory: prints {"auto": ...} with
each rank's N and start line, or the error it raised (test_auto_batch.py).
"""

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, sys.argv[1])  # the repository root

from pretrain import auto_batch  # noqa: E402
from pretrain.accumulation import count_target_tokens  # noqa: E402
from pretrain.config import ModelConfig, load_config, parse_cli  # noqa: E402
from pretrain.engines import build_accelerator  # noqa: E402
from pretrain.errors import ConfigError  # noqa: E402
from pretrain.models import build_model, build_model_config  # noqa: E402
from pretrain.noise_scale import estimate  # noqa: E402
from pretrain.setup import check_model  # noqa: E402
from pretrain.step import optimizer_step  # noqa: E402

K = 3
accelerator = build_accelerator(load_config(*parse_cli(["--tracking.backends=[]", "--tracking.curves=false"])))
accelerator.gradient_accumulation_steps = K
assert accelerator.num_processes == 2, accelerator.num_processes
torch.manual_seed(0)
model = build_model(build_model_config(ModelConfig("embedding_linear", {"hidden_size": 8}), 50, {}))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
model, optimizer = accelerator.prepare(model, optimizer)

agreement = []
original_backward = accelerator.backward


def recording_backward(loss, **kwargs):
    original_backward(loss, **kwargs)
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    gathered = [torch.empty_like(grads) for _ in range(2)]
    dist.all_gather(gathered, grads)
    agreement.append([len(agreement) + 1, bool(torch.equal(gathered[0], gathered[1]))])


accelerator.backward = recording_backward
generator = torch.Generator().manual_seed(accelerator.process_index)  # different data on each rank
results = {}
for sync_each_batch in (False, True):
    accelerator.gradient_state.plugin_kwargs["sync_each_batch"] = sync_each_batch
    micro_batches = [{"input_ids": torch.randint(0, 50, (2, 6), generator=generator),
                      "labels": torch.randint(0, 50, (2, 6), generator=generator)} for _ in range(K)]
    tokens = int(accelerator.reduce(count_target_tokens(micro_batches), "sum"))
    agreement.clear()
    optimizer_step(accelerator, model, optimizer, micro_batches, global_tokens=tokens, max_grad_norm=1.0)
    results[str(sync_each_batch).lower()] = list(agreement)
if accelerator.is_main_process:
    print(json.dumps(results))

accelerator.gradient_state.plugin_kwargs["sync_each_batch"] = False
micro_batches = [{"input_ids": torch.randint(0, 50, (2, 6), generator=generator),
                  "labels": torch.randint(0, 50, (2, 6), generator=generator)} for _ in range(K)]
for micro_batch in micro_batches:  # ragged: a different number of targets in each micro-batch and on each rank
    micro_batch["labels"][torch.rand(2, 6, generator=generator) < 0.4] = -100
weights = {name: value.detach().clone() for name, value in accelerator.unwrap_model(model).state_dict().items()}
tokens = int(accelerator.reduce(count_target_tokens(micro_batches), "sum"))
result = optimizer_step(accelerator, model, optimizer, micro_batches, global_tokens=tokens, max_grad_norm=1.0,
                        measure_small_batch=True)
estimates = estimate(accelerator, result.small_batch, (tokens, result.grad_norm))
every_rank = [None, None]
dist.all_gather_object(every_rank, {"micro_batches": micro_batches, "small_batch": result.small_batch})
if accelerator.is_main_process:
    torch.save({"weights": weights, "ranks": every_rank, "grad_norm": result.grad_norm, "estimates": estimates},
               sys.argv[2])
del model, optimizer
accelerator.free_memory()


# micro_batch_size: auto, G = 16 on 2 processes (N = 8, 4, 2, 1 to try), with rank 1 out of memory from N = 4 on,
# then from N = 1 on (nothing fits there). Each rank's answer: its N and line, or the error it raised.
def out_of_memory_from(smallest):
    def scratch_model(*args):
        model = real_scratch_model(*args)
        if accelerator.process_index == 1:
            model.register_forward_pre_hook(lambda module, args, kwargs: raise_out_of_memory(
                kwargs["input_ids"].shape[0] >= smallest), with_kwargs=True)
        return model
    return scratch_model


def raise_out_of_memory(whether):
    if whether:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")


real_scratch_model = auto_batch.scratch_model
auto = load_config(*parse_cli(["--tracking.backends=[]", "--tracking.curves=false", "--train.micro_batch_size=auto",
                               "--train.global_batch_size=16", "--train.gradient_accumulation_steps=null"]))
checked = check_model(auto, accelerator)
answers = {}
for smallest in (4, 1):
    auto_batch.scratch_model = out_of_memory_from(smallest)
    try:
        answer = list(auto_batch.choose_micro_batch(auto, accelerator, checked.config, checked.parameters))
    except ConfigError as err:
        answer = [type(err).__name__, str(err)]
    every_rank = [None, None]
    dist.all_gather_object(every_rank, answer)
    answers[f"out of memory from {smallest}"] = every_rank
if accelerator.is_main_process:
    print(json.dumps({"auto": answers}), flush=True)
dist.destroy_process_group()
# Everything is checked and printed. The interpreter's own teardown after this script aborts about one run in ten
# ("terminate called without an active exception", no Python frame left), which a real run does not show.
os._exit(0)
