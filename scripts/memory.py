"""Resident memory of a converted model loaded dense (mlx-lm) and with FlashHead, side by side.

Each load runs in its own process, after one forward pass so every weight is materialised:

    python scripts/memory.py --model DIR
"""

import argparse
import json
import subprocess
import sys

CHILD = """
import json, sys
import mlx.core as mx
from flashhead_mlx.blas import reexec_with_openblas
from flashhead_mlx import decoding, load

model, _ = load(sys.argv[1], flashhead=sys.argv[2] == "flashhead")
with decoding():
    step = model(mx.array([[4]]))
mx.eval(model(mx.array([[1, 2, 3]])), step)
rss = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS"))
print(json.dumps({"active_mb": mx.get_active_memory() / 2**20, "rss_mb": rss / 1024}))
"""


def measure(model: str, head: str) -> dict:
    output = subprocess.run(
        [sys.executable, "-c", CHILD, model, head], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    reexec_with_openblas([__file__, *sys.argv[1:]])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="A converted FlashHead folder.")
    args = parser.parse_args()
    dense, flash = measure(args.model, "dense"), measure(args.model, "flashhead")
    print(f"{'head':10s} {'MLX active MiB':>15s} {'process RSS MiB':>16s}")
    for name, numbers in (("dense", dense), ("FlashHead", flash)):
        print(f"{name:10s} {numbers['active_mb']:15.1f} {numbers['rss_mb']:16.1f}")
    print(f"FlashHead / dense active memory: {flash['active_mb'] / dense['active_mb']:.3f}")


if __name__ == "__main__":
    main()
