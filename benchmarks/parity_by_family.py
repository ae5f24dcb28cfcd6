"""Parity of the weight fold against the hooked original, per registered model type.

For every registered model type: the tiny random model of ``tests/tiny.py`` (4 blocks, d_model 64),
a random unit direction r̂, and chat-templated prompts from the bundled harmless evaluation set, each
run unpadded. Reported per family:

- fp32: max |Δlogit| / max |logit| between the hooked original (r̂ projected out of every residual
  writer's output) and the model folded in fp32; the same for a fold along a different random
  direction, which shows the size a wrong edit has;
- bf16: the model cast to bf16 and folded in bf16, against the fp32 hooked reference: mean KL and
  top-1 agreement, next to the KL of the hooked bf16 model (the noise bf16 alone causes);
- post-norm families: max |Δlogit| / max |logit| between the fold and full residual-stream ablation
  (r̂ removed from every term added to the residual stream), the part the fold cannot reproduce.

Usage:
    python benchmarks/parity_by_family.py [--prompts 8] [--output benchmarks/parity_by_family.md]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests")]

from tiny import make_model, make_tokenizer  # noqa: E402

from abliterate.adapters import resolve_adapter  # noqa: E402
from abliterate.adapters.registry import registered_model_types  # noqa: E402
from abliterate.edit.declared import DeclaredEdit  # noqa: E402
from abliterate.edit.direction import unit_rows  # noqa: E402
from abliterate.edit.walker import fold_direction  # noqa: E402
from abliterate.find.scores import kl_divergence  # noqa: E402
from abliterate.model.hooks import ablated, projection  # noqa: E402
from abliterate.prove.residual import full_projection, residual_sites  # noqa: E402

COMMAND = "python benchmarks/parity_by_family.py"


def _prompts(count: int) -> list[torch.Tensor]:
    tokenizer = make_tokenizer()
    texts = json.loads((REPO_ROOT / "abliterate" / "data" / "harmless_eval.json").read_text())[:count]
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": text}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
        for text in texts
    ]


def _logits(model: torch.nn.Module, prompts: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(input_ids=ids).logits[0].double() for ids in prompts])


def _relative(reference: torch.Tensor, other: torch.Tensor) -> float:
    return (reference - other).abs().max().item() / reference.abs().max().item()


def _unit(size: int, generator: torch.Generator) -> torch.Tensor:
    return unit_rows(torch.randn(size, generator=generator))


def measure(model_type: str, prompts: list[torch.Tensor]) -> dict[str, float | str | bool]:
    """The parity numbers of one model type (see the module docstring)."""
    started = time.perf_counter()
    model = make_model(model_type)
    adapter = resolve_adapter(model)
    generator = torch.Generator().manual_seed(0)
    direction, wrong = _unit(model.config.hidden_size, generator), _unit(model.config.hidden_size, generator)

    with ablated(model, adapter, projection(direction)):
        reference = _logits(model, prompts)
    with ablated(model, adapter, full_projection(direction), where=residual_sites):
        full_ablation = _logits(model, prompts)
    folded, folded_wrong = copy.deepcopy(model), copy.deepcopy(model)
    fold_direction(folded, adapter, DeclaredEdit(direction))
    fold_direction(folded_wrong, adapter, DeclaredEdit(wrong))
    edited, edited_wrong = _logits(folded, prompts), _logits(folded_wrong, prompts)

    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    with ablated(model_bf16, adapter, projection(direction)):
        hooked_bf16 = _logits(model_bf16, prompts)
    fold_direction(model_bf16, adapter, DeclaredEdit(direction))
    edited_bf16 = _logits(model_bf16, prompts)
    return {
        "model_type": model_type,
        "adapter": adapter.name,
        "post_norm": adapter.post_norm,
        "positions": reference.shape[0],
        "fp32_rel": _relative(reference, edited),
        "fp32_wrong_rel": _relative(reference, edited_wrong),
        "bf16_kl": kl_divergence(reference, edited_bf16).mean().item(),
        "bf16_noise_kl": kl_divergence(reference, hooked_bf16).mean().item(),
        "bf16_top1": (reference.argmax(-1) == edited_bf16.argmax(-1)).double().mean().item(),
        "full_ablation_rel": _relative(full_ablation, edited),
        "seconds": time.perf_counter() - started,
    }


def markdown(rows: list[dict[str, float | str | bool]], prompt_count: int) -> str:
    """The results as a markdown section with the command that produced them."""
    lines = [
        "# Parity by family",
        "",
        f"Produced by `{COMMAND} --prompts {prompt_count}` (torch {torch.__version__}, CPU, one thread).",
        f"Tiny random models from `tests/tiny.py`; {prompt_count} chat-templated prompts from",
        "`abliterate/data/harmless_eval.json`, unpadded; one random unit direction r̂ per model.",
        "fp32 columns: max |Δlogit| / max |logit| against the hooked original (r̂ projected out of the",
        "embeddings' and every residual writer's output); *wrong r̂*: the same for a fold along another",
        "random direction. bf16: model cast to bf16 and folded in bf16, against the fp32 hooked reference;",
        "*noise KL* is the hooked bf16 model's KL, i.e. what bf16 costs without any edit. *Post-norm gap*:",
        "fold vs. full residual-stream ablation (r̂ removed from every term added to the residual stream),",
        "zero by construction for pre-norm families.",
        "",
        "| model type | adapter | positions | fp32 max\\|Δ\\|/scale | wrong r̂ | bf16 mean KL | bf16 noise KL "
        "| bf16 top-1 | post-norm gap |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        gap = f"{row['full_ablation_rel']:.1e}" if row["post_norm"] else "—"
        lines.append(
            f"| `{row['model_type']}` | {row['adapter']} | {row['positions']} | {row['fp32_rel']:.1e} "
            f"| {row['fp32_wrong_rel']:.2f} | {row['bf16_kl']:.1e} | {row['bf16_noise_kl']:.1e} "
            f"| {row['bf16_top1']:.3f} | {gap} |"
        )
    worst = max(rows, key=lambda row: row["fp32_rel"])
    lines += [
        "",
        f"Worst fp32 ratio: {worst['fp32_rel']:.1e} (`{worst['model_type']}`), against a gate of 1e-4 in",
        "`tests/test_adapters.py`; a wrong direction moves logits by 20–100 % of their scale.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Measure every registered model type, print the table and write it to ``--output``."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=8, help="number of chat prompts per family")
    parser.add_argument(
        "--output", type=Path, default=REPO_ROOT / "benchmarks" / "parity_by_family.md", help="markdown file"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    prompts = _prompts(args.prompts)
    rows = []
    for model_type in registered_model_types():
        rows.append(measure(model_type, prompts))
        print(json.dumps(rows[-1]), file=sys.stderr)
    text = markdown(rows, args.prompts)
    args.output.write_text(text, encoding="utf-8")
    print(text, end="")


if __name__ == "__main__":
    main()
