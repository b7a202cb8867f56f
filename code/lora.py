"""Print the appendix sanity report of LoRALinear and DoRALinear; exit 1 if any check fails.

    python code/lora.py

IN = 32, OUT = 48, r = 8, alpha = 16, on the CPU, in about two seconds (most of it importing torch).
"""

import sys

from lora_edu import run_sanity_checks


def main() -> int:
    checks = run_sanity_checks(in_features=32, out_features=48, r=8, alpha=16)
    for check in checks:
        print(check.line())
    failed = [c.label for c in checks if not c.passed]
    if failed:
        print(f"FAILED invariant(s): {', '.join(f'[{x}]' for x in failed)}", file=sys.stderr)
        return 1
    print(f"all {len(checks)} LoRA / DoRA sanity checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
