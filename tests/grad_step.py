"""One optimizer step's gradients of sft.py's loss on world/base, in float64, for tests/test_train.py:

    python tests/grad_step.py OUT.safetensors MICRO [fsdp] [lora]     # torchrun --nproc_per_node N for N processes

Rank 0 saves the full gradients. In float64 the summation order of another split (micro-batches, processes,
FSDP shards) moves them by ~1e-16 relative, so they can be compared before Adam amplifies any noise. `lora`: LoRA
adapters (r 4, no dropout, B drawn at random so that A gets a gradient too); only the adapters' gradients are saved."""
import os
import sys

import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import sft  # noqa: E402

out, micro, fsdp, lora = sys.argv[1], int(sys.argv[2]), "fsdp" in sys.argv[3:], "lora" in sys.argv[3:]
torch.set_num_threads(1)
rt = common.setup_distributed("cpu")  # compute in the parameters' dtype: float64 below
args = sft.Args(compile=False, dataset=os.path.join(common.WORLD_DIR, "data", "math", "train.jsonl"), lora_r=4 if lora else 0,
                lora_dropout=0.0)
model, tokenizer = common.load_model(os.path.join(common.WORLD_DIR, "base"), "float32", rt.device)
torch.manual_seed(0)
model = common.add_lora(model, args).double()
for name, p in model.named_parameters():
    if "lora_B" in name:
        torch.nn.init.normal_(p, std=0.1)
train, _ = common.load_sft_data(args.dataset, tokenizer, args.max_length, args.overlong, limit=256)
schedule = common.batch_schedule([len(e["input_ids"]) for e in train], 8, 1, args.seed)
wrapped = common.wrap_model(model, lambda m, b: sft.compute_loss(m, b, args), rt, fsdp)
batches = [common.collate(train, ids, tokenizer.pad_token_id, rt.device) for ids in common.micro_batches(schedule[0], rt, micro)]
global_tokens = common.count_loss_tokens(batches)
for i, batch in enumerate(batches):
    with common.gradient_sync(wrapped, sync=i == len(batches) - 1):
        loss_sum, _ = wrapped(batch)
        common.normalized_loss(loss_sum, global_tokens, rt.world_size).backward()
grads = {name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().contiguous()
         for name, p in model.named_parameters() if p.requires_grad}
if rt.is_main:
    save_file(grads, out)
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
