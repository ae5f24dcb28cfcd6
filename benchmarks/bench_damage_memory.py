"""Peak RSS of the multi-token KL on the demo, with and without the per-pass logits bound.

The search's damage stage and the run's evaluation call ``multi_token_kl`` on up to 32 prompts at once;
with the demo's 151,936-token vocabulary one float32 ``rows × positions × vocabulary`` tensor of 32 rows
× 65 positions is 1.2 GB, and a pass holds several. ``abliterate.find.damage.LOGITS_BYTES`` cuts passes
so one such tensor stays under 256 MiB. Each case runs in a fresh process: load the demo, record the
original's greedy replies to 32 harmless prompts (64 tokens), reset the high-water mark, then time the
hooked multi-token KL of the paper rule's edit (``--direction``) at ``batch_size=32``; the bound off is
``LOGITS_BYTES`` set to 2**62.

    python benchmarks/bench_damage_memory.py --direction /tmp/demo_default/direction.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_CHILD = """
import json, sys, time
from abliterate.adapters.resolve import resolve_adapter
from abliterate.find import damage
from abliterate.model.hooks import ablated, edit_projection
from abliterate.model.loading import load_model
from abliterate.model.prompts import bundled
from abliterate.ship.direction_file import declared_from_file, load_direction

def status(key):
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(key + ":"))

direction, bound = sys.argv[1], sys.argv[2] == "on"
if not bound:
    damage.LOGITS_BYTES = 2**62
loaded = load_model("demo", dtype="float32", device="cpu")
model, tokenizer = loaded.model, loaded.tokenizer
edit = declared_from_file(*load_direction(direction))
reference = damage.record_reference(model, tokenizer, bundled("harmless", "eval")[:32], max_new_tokens=64,
                                    batch_size=32)
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")
baseline = status("VmRSS")
started = time.perf_counter()
summary = damage.multi_token_kl(model, reference, lambda: ablated(model, resolve_adapter(model),
                                edit_projection(edit)), batch_size=32)
print(json.dumps({"bound": bound, "kl": summary.mean, "seconds": time.perf_counter() - started,
                  "baseline": baseline, "peak": status("VmHWM")}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--direction", required=True, help="a direction.safetensors of the demo")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    print("| LOGITS_BYTES bound | multi-token KL | s | RSS before | peak RSS | growth |")
    print("|---|---:|---:|---:|---:|---:|")
    for bound in ("off", "on"):
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, args.direction, bound],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(done.stdout.strip().splitlines()[-1])
        gib = 2**30
        print(
            f"| {bound} | {r['kl']:.6f} | {r['seconds']:.1f} | {r['baseline'] / gib:.2f} GiB | "
            f"{r['peak'] / gib:.2f} GiB | {(r['peak'] - r['baseline']) / gib:.2f} GiB |",
            flush=True,
        )


if __name__ == "__main__":
    main()
