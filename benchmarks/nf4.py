"""NF4 quantize and dequantize: lora_edu against bitsandbytes, timed in the same run.

    python benchmarks/nf4.py [--quick] [--markdown] [--devices cpu cuda] [--repeats N]

For each device (the CPU, and the GPU when torch.cuda.is_available()), each size
(4096 x 4096 and 8192 x 8192; --quick: 256 x 256 and 512 x 512) and each input dtype
(float32, bfloat16) it times, with blocks of 64 weights and no double quantization:

    quantize              quantize_nf4(w)               bitsandbytes.functional.quantize_4bit(
                                                            w, blocksize=64, quant_type="nf4")
    dequantize            q.dequantize()                bitsandbytes.functional.dequantize_4bit(packed, state)
    dequantize, compiled  q.dequantize(compiled=True)   the same bitsandbytes call
    dequantize, triton    q.dequantize(compiled="triton")
                                                the same call (GPU only: a hand-written
                                                Triton kernel, launched without torch.compile)
    dequantize, cpp       q.dequantize(compiled="cpp")  the same call (CPU only: a hand-written
                                                C++ kernel, built on first use)

Each time is the median over --repeats rounds, after warm-up calls (on a GPU, for at
least 250 ms); ours and bitsandbytes take turns round by round, so a busy machine slows
both alike. A round repeats one call for about 20 ms on the CPU (one call, for the large
sizes), timed with time.perf_counter, or 5 ms on a GPU, between two CUDA events; the
time per call is shown. On a GPU launch overhead thus counts only where it keeps the GPU
waiting. Every call allocates its output, as a caller's would; on the CPU that includes
the first touch of fresh pages, which for large outputs costs as much as the arithmetic.

Effective GB/s counts the fewest bytes the operation must move, each input read once
and each output written once, for n weights of s bytes (4 for float32, 2 for bfloat16):
quantize reads n * s and writes n / 2 code bytes plus 4 * n / 64 scale bytes; dequantize
reads those and writes n * s. Temporaries and extra passes are not counted: a path that
makes them shows a lower figure. ours/bnb is the ratio of the times (below 1: ours is
faster).

Before timing, each case is checked: our compiled, Triton (GPU) or C++ (CPU) and eager dequantize
must return the same bits as the plain definition (unpack_nibbles, then dequantize_blockwise), or the
script stops. "same bits" says whether ours and bitsandbytes agree to the bit: codes and
scales for quantize; for dequantize, the weights each rebuilds from bitsandbytes' codes
and scales. This is a benchmark, not a test: timings depend on the machine and on what
else it runs, so no test calls it.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time

import torch
from tqdm import tqdm

import lora_edu
from lora_edu.quant.blockwise import dequantize_blockwise, unpack_nibbles

BLOCK_SIZE = 64  # QLoRA's block, bitsandbytes' default
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ROUND_MS = {"cpu": 20.0, "cuda": 5.0}  # a timed round repeats the call for about this long
WARMUP_MS = {"cpu": 0.0, "cuda": 250.0}  # warm-up lasts at least this long (GPU clocks, first calls)


def check_no_dynamo() -> None:
    """lora_edu imports torch._dynamo (over a second) only for a compiled dequantize."""
    lora_edu.quantize_nf4(torch.randn(128, 64)).dequantize()
    assert "torch._dynamo" not in sys.modules, "importing lora_edu or an eager dequantize imported torch._dynamo"


def bits(t: torch.Tensor) -> torch.Tensor:
    """The same memory as integers, so that -0.0 and 0.0 (or two NaNs) compare by their bits."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a), bits(b))


def time_call(fn, device: torch.device, calls: int) -> float:
    """Milliseconds per call of fn, over `calls` calls in a row."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # start on an idle GPU
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / calls
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) * 1e3 / calls


def time_pair(ours, theirs, device: torch.device, repeats: int, warmup: int):
    """Median ms per call of ours and of theirs, the two alternating round by round.

    A round is as many calls in a row as fill about ROUND_MS (at least one), so that
    small sizes are not lost in the timer's resolution and the scheduler's ticks.
    """
    start, done = time.perf_counter(), 0
    while done < warmup or (time.perf_counter() - start) * 1e3 < WARMUP_MS[device.type]:
        time_call(ours, device, 1)
        time_call(theirs, device, 1)
        done += 1
    slower = max(time_call(ours, device, 1), time_call(theirs, device, 1))
    calls = max(1, min(1000, int(ROUND_MS[device.type] / max(slower, 1e-3))))
    t_ours, t_theirs = [], []
    for _ in range(repeats):
        t_ours.append(time_call(ours, device, calls))
        t_theirs.append(time_call(theirs, device, calls))
    return statistics.median(t_ours), statistics.median(t_theirs)


def bytes_moved(n: int, dtype: torch.dtype) -> int:
    """Fewest bytes read plus written: the weights, n / 2 code bytes, n / 64 float32 scales."""
    weights = n * torch.empty(0, dtype=dtype).element_size()
    packed = n // 2 + 4 * (n // BLOCK_SIZE)
    return weights + packed  # quantize reads the weights, writes the rest; dequantize the reverse


def cases_for(device: torch.device, size: int, dtype: torch.dtype, bnb):
    """(op, ours, theirs, same bits) for one weight; stops if our dequantize paths disagree."""
    g = torch.Generator().manual_seed(size)
    w = torch.randn(size, size, generator=g).to(device=device, dtype=dtype)  # [out, in]
    q = lora_edu.quantize_nf4(w, BLOCK_SIZE)
    packed, state = bnb.quantize_4bit(w, blocksize=BLOCK_SIZE, quant_type="nf4")

    definition = dequantize_blockwise(unpack_nibbles(q.codes, q.numel()), q.absmax,
                                      q.levels.to(device), BLOCK_SIZE).view(w.shape).to(dtype)
    eager, compiled = q.dequantize(), q.dequantize(compiled=True)  # (the first compiled call compiles)
    assert same_bits(eager, definition), f"eager dequantize differs from the definition on {device}"
    assert same_bits(compiled, eager), f"compiled dequantize differs from the eager one on {device}"
    kernel = "triton" if device.type == "cuda" else "cpp"  # the hand-written kernel of this device
    assert same_bits(q.dequantize(compiled=kernel), eager), f"{kernel} dequantize differs from the eager one"

    quantize_same = torch.equal(q.codes, packed.view(-1)) and same_bits(q.absmax, state.absmax)
    # dequantize compared on bitsandbytes' own codes and scales, so that it stands alone
    theirs_as_ours = lora_edu.QuantizedTensor(packed.view(-1), state.absmax, w.shape, dtype, BLOCK_SIZE)
    theirs_rebuilt = bnb.dequantize_4bit(packed, state).view(w.shape)
    dequantize_same = same_bits(theirs_as_ours.dequantize(), theirs_rebuilt)
    kernel_same = same_bits(theirs_as_ours.dequantize(compiled=kernel), theirs_rebuilt)

    def theirs_dequantize():
        return bnb.dequantize_4bit(packed, state)

    cases = [
        ("quantize", lambda: lora_edu.quantize_nf4(w, BLOCK_SIZE),
         lambda: bnb.quantize_4bit(w, blocksize=BLOCK_SIZE, quant_type="nf4"), quantize_same),
        ("dequantize", q.dequantize, theirs_dequantize, dequantize_same),
        ("dequantize, compiled", lambda: q.dequantize(compiled=True), theirs_dequantize, dequantize_same),
    ]
    cases.append((f"dequantize, {kernel}", lambda: q.dequantize(compiled=kernel), theirs_dequantize, kernel_same))
    return w.numel(), cases


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {torch.get_num_threads()} threads"


def format_table(rows, markdown: bool) -> str:
    header = ["device", "size", "dtype", "op", "ours ms", "bnb ms", "ours/bnb", "ours GB/s", "bnb GB/s", "same bits"]
    body = [[r["device"], r["size"], r["dtype"], r["op"], f"{r['ours']:.3f}", f"{r['bnb']:.3f}",
             f"{r['ours'] / r['bnb']:.2f}", f"{r['bytes'] / r['ours'] / 1e6:.1f}",
             f"{r['bytes'] / r['bnb'] / 1e6:.1f}", "yes" if r["same"] else "no"] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 4 + ["---:"] * 5 + ["---"]) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    return "\n".join("  ".join(str(x).ljust(w_) for x, w_ in zip(row, widths)) for row in [header] + body)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="256 x 256 and 512 x 512, few repeats: a smoke run")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown, with versions")
    parser.add_argument("--devices", nargs="+", choices=["cpu", "cuda"],
                        help="default: cpu, and cuda when torch.cuda.is_available()")
    parser.add_argument("--repeats", type=int, help="timed rounds per op (default 5 on the CPU, 20 on a GPU; "
                                                    "--quick: 3)")
    args = parser.parse_args(argv)

    check_no_dynamo()  # before bitsandbytes, which imports torch._dynamo itself
    import bitsandbytes
    import bitsandbytes.functional as bnb

    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if "cuda" in devices and not torch.cuda.is_available():
        parser.error("--devices cuda, but torch.cuda.is_available() is False")
    sizes = [256, 512] if args.quick else [4096, 8192]
    plan = [(torch.device(d), s, name) for d in devices for s in sizes for name in DTYPES]

    rows = []
    ops = {"cpu": 4, "cuda": 4}  # quantize, dequantize, compiled, and the device's hand-written kernel
    with tqdm(total=sum(ops[d.type] for d, _, _ in plan), desc="nf4 benchmark", unit="op") as bar:
        for device, size, dtype_name in plan:
            repeats = args.repeats or (3 if args.quick else {"cpu": 5, "cuda": 20}[device.type])
            warmup = 1 if device.type == "cpu" else 3
            bar.set_postfix_str(f"{device.type} {size}x{size} {dtype_name}: checking, compiling")
            n, cases = cases_for(device, size, DTYPES[dtype_name], bnb)
            for op, ours, theirs, same in cases:
                bar.set_postfix_str(f"{device.type} {size}x{size} {dtype_name} {op}")
                t_ours, t_bnb = time_pair(ours, theirs, device, repeats, warmup)
                rows.append(dict(device=device.type, size=f"{size}x{size}", dtype=dtype_name, op=op, ours=t_ours,
                                 bnb=t_bnb, bytes=bytes_moved(n, DTYPES[dtype_name]), same=same))
                bar.update()
            del cases
            if device.type == "cuda":
                torch.cuda.empty_cache()

    if args.markdown:
        names = "; ".join(f"{d}: {device_name(torch.device(d))}" for d in devices)
        print(f"NF4, blocks of 64: lora_edu against bitsandbytes, {datetime.date.today().isoformat()}. "
              f"torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}, "
              f"Python {platform.python_version()}. {names}.\n")
    print(format_table(rows, args.markdown))
    if args.markdown:
        print("\nms: median time per call. GB/s: (bytes read + bytes written) / time, counting each input "
              "read once and each output written once (n weights: n * 4 or n * 2 bytes of weights, "
              "n / 2 code bytes, n / 16 bytes of float32 scales). ours/bnb: ratio of times.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
