"""Measure the parity gate's margins on a real model: every negative control must fail, the edit pass.

For each control of ``abliterate.prove.controls`` (and the complete edit) the script folds the model in
memory, saves it as a safetensors checkpoint, and runs the gate's ingredients: the weight certificate
against the unedited checkpoint (saved once in the same dtype), and logit parity against the hooked
original with the measured rounding floor. The completeness check runs once on the original
(with the adapter as registered, and with each writer group dropped from it, which it must reject).

Usage:
    python benchmarks/gate_controls.py --model demo --dtype bfloat16 --direction DIR/direction.safetensors
    python benchmarks/gate_controls.py --model demo --dtype float16 --direction ... --markdown

Prints one row per control (statistic, limit, verdict) and a markdown table with ``--markdown``.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

import torch

from abliterate.adapters.resolve import resolve_adapter
from abliterate.adapters.spec import writer_group
from abliterate.edit.declared import DeclaredEdit
from abliterate.model.batching import encode
from abliterate.model.loading import load_model
from abliterate.model.prompts import bundled
from abliterate.prove.certificate import certify_checkpoint
from abliterate.prove.controls import available_controls, fold_control
from abliterate.prove.gate import completeness_on, edited_parity, hooked_reference
from abliterate.ship.direction_file import load_direction


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="demo")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--direction", required=True)
    parser.add_argument("--prompts", type=int, default=4, help="harmful + harmless parity prompts each")
    parser.add_argument("--workdir", default=None, help="where to write the control checkpoints")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()

    direction, _ = load_direction(args.direction)
    loaded = load_model(args.model, dtype=args.dtype, device="cpu")
    model, tokenizer = loaded.model, loaded.tokenizer
    adapter = resolve_adapter(model)
    texts = bundled("harmful", "eval")[-args.prompts :] + bundled("harmless", "eval")[-args.prompts :]
    prompts = encode(tokenizer, texts, batch_size=len(texts), share_prefix=False)
    rows = []

    started = time.perf_counter()
    complete = completeness_on(model, adapter, prompts)
    rows.append(("completeness: adapter as registered", complete.max_statistic, 1.0, complete.passed))
    for group in sorted({writer_group(w) for w in adapter.writers}):
        reduced = dataclasses.replace(
            adapter, writers=tuple(w for w in adapter.writers if writer_group(w) != group)
        )
        try:
            report = completeness_on(model, reduced, prompts)
            rows.append((f"completeness: adapter without {group}", report.max_statistic, 1.0, report.passed))
        except LookupError as error:  # the adapter itself refuses a block with no writer of a role
            rows.append((f"completeness: adapter without {group}", float("nan"), 1.0, f"refused: {error}"))
    print(f"completeness: {time.perf_counter() - started:.1f}s")

    reference = hooked_reference(model, adapter, DeclaredEdit(direction), prompts, loaded.dtype_name)
    original_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gate-controls-"))
    original_dir = workdir / "original"
    model.save_pretrained(original_dir)
    tokenizer.save_pretrained(original_dir)
    declared = DeclaredEdit(direction)
    for control in ["complete", *available_controls(model, adapter)]:
        fold_control(model, adapter, direction, control)
        parity = edited_parity(model, adapter, prompts, reference)
        control_dir = workdir / control.replace(":", "_")
        model.save_pretrained(control_dir)
        certificate = certify_checkpoint(original_dir, control_dir, declared, progress=False)
        shutil.rmtree(control_dir)
        rows.append(
            (
                f"{control}: certificate, largest leak along r̂ / rounding floor "
                f"({certificate.n_failures} of {certificate.n_tensors} tensors fail)",
                certificate.max_leak_ratio,
                certificate.leak_ratio_limit,
                certificate.passed,
            )
        )
        kl_ok = parity.trimmed_mean_kl <= (parity.mean_kl_limit or 0)
        rows.append(
            (f"{control}: parity, trimmed mean KL", parity.trimmed_mean_kl, parity.mean_kl_limit, kl_ok)
        )
        top1_ok = parity.top1_agreement >= (parity.top1_agreement_limit or 1)
        rows.append(
            (
                f"{control}: parity, top-1 agreement",
                parity.top1_agreement,
                parity.top1_agreement_limit,
                top1_ok,
            )
        )
        model.load_state_dict(original_state, strict=False)
        print(
            control,
            "certificate",
            certificate.passed,
            certificate.failures[:1],
            "parity",
            parity.passed,
            parity.reason,
        )
    shutil.rmtree(workdir)
    if args.markdown:
        print("| check | statistic | limit | passed |\n|---|---:|---:|---|")
        for name, value, limit, passed in rows:
            shown = "" if value != value else f"{value:.4g}"
            print(f"| {name} | {shown} | {'' if limit is None else f'{limit:.4g}'} | {passed} |")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
