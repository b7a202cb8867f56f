"""Measure the peak GPU memory of a training step and set it beside the ledger's prediction.

    python code/measure_memory.py [--out lora_edu/data/memory_gpu.json] [--quick]
    python code/measure_memory.py --repredict lora_edu/data/memory_gpu.json   (no GPU needed)

Needs a CUDA GPU (exits with a message otherwise). For two LLaMA-shaped TinyLlama sizes it
builds, on the GPU, one model per method:

    full    bf16 weights, every one trained; lora_edu.Adam with float32 master weights
    lora    bf16 frozen base, float32 adapters on q, k, v, o (r = 16)
    qlora   NF4 base (blocks of 64, double quantization), bf16 compute, float32 adapters
            on every decoder linear (r = 16)

and LoRA and QLoRA again with gradient checkpointing. Each takes one warm-up step (so
Adam's states exist), then one measured step: torch.cuda.memory_allocated before it
(resident) and after its forward, backward and optimizer step, and
torch.cuda.max_memory_allocated over it (peak). The prediction is
lora_edu.memory.peak.estimate_peak for the same setting. The JSON records the date, the device,
torch's version, every setting and both numbers; chapter 4 reads it and
tests/test_memory_data.py checks it against the current ledger. --quick runs one small size.
--repredict rewrites only the predictions of an existing file, after a change to the ledger.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import sys
from pathlib import Path

import torch

from lora_edu import LLAMA_TARGETS, Adam, TinyConfig, TinyLlama, inject_lora, prepare_qlora
from lora_edu.memory.spec import spec_from_tiny_config
from lora_edu.memory.peak import estimate_peak
from lora_edu.tiny.model import lm_loss

SIZES = {  # LLaMA proportions: head size 128, d_ff about 8/3 d_model rounded as LLaMA does
    "0.5B": TinyConfig(vocab_size=32000, block_size=512, n_layer=8, n_head=16, d_model=2048, d_ff=5632),
    "1.9B": TinyConfig(vocab_size=32000, block_size=512, n_layer=8, n_head=32, d_model=4096, d_ff=11008),
}
QUICK = {"tiny": TinyConfig(vocab_size=512, block_size=128, n_layer=2, n_head=4, d_model=256, d_ff=688)}
RUNS = [  # method, targets, checkpointing
    ("full", (), False),
    ("lora", ("q", "k", "v", "o"), False),
    ("lora", ("q", "k", "v", "o"), True),
    ("qlora", "all-linear", False),
    ("qlora", "all-linear", True),
]
R, BATCH, SEQ_LEN = 16, 4, 512
POLICY = {"full": dict(policy="mixed_fp32_master"),
          "lora": dict(policy="mixed_fp32_master", adapter_policy="fp32"),
          "qlora": dict(policy="mixed_fp32_master", adapter_policy="fp32")}


def build(cfg: TinyConfig, method: str, targets, checkpointing: bool, device):
    torch.manual_seed(0)
    with torch.device(device):
        model = TinyLlama(cfg)
    model.gradient_checkpointing = checkpointing
    names = list(LLAMA_TARGETS) if targets == "all-linear" else [f"{t}_proj" for t in targets]
    if method == "qlora":
        prepare_qlora(model, names, r=R)
    else:
        model.bfloat16()
        if method == "lora":
            inject_lora(model, names, r=R)
    opt = Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5, master_weights=method == "full")
    return model, opt


def measure(model, opt, batch) -> dict:
    def step():
        opt.zero_grad()
        lm_loss(model, batch).backward()
        opt.step()

    model.train()
    step()  # warm-up: Adam's states and the master copies now exist
    opt.zero_grad()
    torch.cuda.synchronize()
    out = {"resident": torch.cuda.memory_allocated()}
    torch.cuda.reset_peak_memory_stats()
    loss = lm_loss(model, batch)
    out["after_forward"] = torch.cuda.memory_allocated()
    loss.backward()
    del loss
    out["after_backward"] = torch.cuda.memory_allocated()
    opt.step()
    torch.cuda.synchronize()
    out["after_step"] = torch.cuda.memory_allocated()
    out["peak"] = torch.cuda.max_memory_allocated()
    return out


def library_workspaces(device) -> int:
    """Bytes the CUDA libraries keep after their first matmuls (cuBLAS workspaces), measured."""
    before = torch.cuda.memory_allocated(device)
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.ones(256, 256, device=device, dtype=dtype)
        y = x @ x
        del x, y
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device) - before


def predict(run: dict) -> dict:
    """The ledger's peak for a recorded run's setting."""
    cfg = TinyConfig(**run["config"])
    targets = run["targets"] if isinstance(run["targets"], str) else tuple(run["targets"])
    peak = estimate_peak(spec_from_tiny_config(cfg), run["method"], r=run["r"], targets=targets or "q",
                         batch=run["batch"], seq_len=run["seq_len"], checkpointing=run["checkpointing"],
                         **POLICY[run["method"]])
    return {"resident": peak.resident, "moment": peak.moment, "total": peak.total, "moments": peak.moments}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("lora_edu/data/memory_gpu.json"))
    parser.add_argument("--quick", action="store_true", help="one small size (a smoke test)")
    parser.add_argument("--repredict", type=Path, metavar="JSON",
                        help="recompute the predictions of an existing file from the current ledger; no GPU")
    args = parser.parse_args(argv)
    if args.repredict:
        record = json.loads(args.repredict.read_text())
        for run in record["runs"]:
            run["predicted"] = predict(run)
        args.repredict.write_text(json.dumps(record, indent=1) + "\n")
        print(f"rewrote the predictions in {args.repredict}")
        return 0
    if not torch.cuda.is_available():
        print("code/measure_memory.py measures GPU memory and needs CUDA; the committed data came from an H200",
              file=sys.stderr)
        return 2
    device = torch.device("cuda")
    record = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(device),
              "torch": torch.__version__, "batch": BATCH, "seq_len": SEQ_LEN, "r": R,
              "workspace_bytes": library_workspaces(device), "runs": []}
    sizes = QUICK if args.quick else SIZES
    for size, cfg in sizes.items():
        seq_len = min(SEQ_LEN, cfg.block_size)
        batch = torch.randint(0, cfg.vocab_size, (BATCH, seq_len + 1), device=device,
                              generator=torch.Generator(device).manual_seed(0))
        for method, targets, checkpointing in RUNS:
            model, opt = build(cfg, method, targets, checkpointing, device)
            measured = measure(model, opt, batch)
            del model, opt
            gc.collect()
            torch.cuda.empty_cache()
            run = {"size": size, "config": dataclasses.asdict(cfg), "method": method,
                   "targets": targets if isinstance(targets, str) else list(targets), "r": R, "batch": BATCH,
                   "checkpointing": checkpointing, "seq_len": seq_len, "measured": measured}
            run["predicted"] = peak = predict(run)
            record["runs"].append(run)
            print(f"{size:>5} {method:<6} ckpt={checkpointing!s:<5} measured {measured['peak'] / 2**30:7.3f} GiB  "
                  f"predicted {peak['total'] / 2**30:7.3f} GiB  ({peak['moment']})  "
                  f"ratio {measured['peak'] / peak['total']:.3f}  resident {measured['resident'] / 2**30:.3f} "
                  f"vs {peak['resident'] / 2**30:.3f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
