"""What people read: the console summary and the model card (the candidate heatmap: ``ship.plots``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def gate_lines(gate: dict[str, Any]) -> list[str]:
    """One line per ingredient of a gate report (``GateReport.to_dict()``), with its margin."""
    lines = [f"gate          {'PASS' if gate['passed'] else 'FAIL'}{_compared(gate)}"]
    certificate = gate.get("certificate")
    if certificate and certificate.get("kind") == "lora adapter":
        lines.append(_adapter_line(certificate))
        lines.extend(f"  {failure}" for failure in certificate["failures"][:5])
    elif certificate:
        groups = ", ".join(f"{name} {v['tensors']}" for name, v in certificate["groups"].items())
        lines.append(
            f"certificate   {'PASS' if certificate['passed'] else 'FAIL'}  {certificate['n_edited']} edited "
            f"({certificate['n_exact']} bitwise, {certificate['n_bounded']} within bound; {groups}), "
            f"{certificate['n_unchanged']} unchanged, {certificate['n_failures']} failed"
            f"  [{certificate['seconds']:.1f}s]"
        )
        lines.extend(f"  {failure}" for failure in certificate["failures"][:5])
    files = gate.get("files")
    if files:
        listed = ", ".join(files["files"]) or "none"
        gguf = files["mode"] == "gguf"
        what = "the tokenizer as read from both: " if gguf else "config.json; byte for byte: "
        lines.append(f"files         {'PASS' if files['passed'] else 'FAIL'}  {what}{listed}")
        lines.extend(f"  {failure}" for failure in files["failures"][:5])
    completeness = gate.get("completeness")
    if completeness:
        lines.append(
            f"completeness  {'PASS' if completeness['passed'] else 'FAIL'}  residual statistic "
            f"{_fmt(completeness['max_statistic'])} (limit 1; any writer left out: ≥ "
            f"{_fmt(completeness['min_leave_one_out'])}) over {completeness['n_tokens']} tokens"
        )
    parity = gate.get("parity")
    if parity:
        line = (
            f"parity        {'PASS' if parity['passed'] else 'FAIL'}  max|Δlogit| "
            f"{_fmt(parity['max_abs_logit_diff'])}  KL {_fmt(parity['mean_kl'])}"
        )
        if parity.get("floor_mean_kl") is not None:
            line += (
                f", trimmed {_fmt(parity['trimmed_mean_kl'])} (limit {_fmt(parity['mean_kl_limit'])}, "
                f"floor {_fmt(parity['floor_mean_kl'])})"
            )
        line += f"  top-1 {parity['top1_agreement']:.3f}"
        if parity.get("top1_agreement_limit") is not None:
            line += f" (limit {parity['top1_agreement_limit']:.3f})"
        lines.append(line)
    lines.extend(f"skipped       {name}: {why}" for name, why in gate.get("skipped", {}).items())
    return lines


def _compared(gate: dict[str, Any]) -> str:
    """What the gate compared, for its verdict line: the weights, config.json and the files beside them."""
    parts = []
    certificate = gate.get("certificate")
    if certificate:
        parts.append(f"weights ({certificate['n_tensors']} tensors)")
    files = gate.get("files")
    if files and files["mode"] == "gguf":
        parts.append("the GGUF's tokenizer (" + ", ".join(files["files"]) + "; a GGUF holds no config.json)")
    elif files:
        changed = ", ".join(files["config_changes"])
        parts.append(f"config.json (equal except {changed})" if changed else "config.json (equal)")
        parts.append(f"{len(files['files'])} tokenizer/template/generation files byte for byte")
    return "  compared: " + ", ".join(parts) if parts else ""


def _adapter_line(certificate: dict[str, Any]) -> str:
    """The adapter certificate's line (``abliterate.prove.lora_certificate``): what was compared with what."""
    return (
        f"certificate   {'PASS' if certificate['passed'] else 'FAIL'}  LoRA adapter vs. its recomputation "
        f"from ORIGINAL and the declared edit (rank {certificate['rank']}, "
        f"{certificate['n_targets']} targets): "
        f"{certificate['n_tensors']} tensors of {certificate['n_required']} required, "
        f"{certificate['n_exact']} bitwise and {certificate['n_bounded']} within 1 float32 ulp (finite); "
        f"adapter_config.json {certificate['n_config_fields']} fields; {certificate['n_failures']} failed; "
        f"base model {certificate['base_model']!r}  [{certificate['seconds']:.1f}s]"
    )


def summary_table(manifest: dict[str, Any]) -> str:
    """A small plain-text table of the run's numbers."""
    evaluation = manifest.get("evaluation") or {}
    gate = manifest["gate"]
    rows = [
        ("direction", f"layer {manifest['direction']['layer']}, position {manifest['direction']['position']}")
    ]
    if evaluation:
        before, after = evaluation["before"], evaluation["after"]
        if "judged_refusal_rate" in after:
            judged = f"{before['judged_refusal_rate']:.1%} -> {after['judged_refusal_rate']:.1%}"
            note = "after: a lower bound, dodges missed"
            rows.append(("not helped (judge)", f"{judged} (n={after['n']}; {note})"))
        markers = f"{before['refusal_rate']:.1%} -> {after['refusal_rate']:.1%}"
        rows.append(("refusal markers", f"{markers} (n={after['n']})"))
        rows.append(("KL harmless (1st token)", _fmt(evaluation["kl_harmless"])))
        if "multi_token_kl" in evaluation:
            rows.append(("KL harmless (replies)", _fmt(evaluation["multi_token_kl"]["mean"])))
    search = manifest.get("search") or {}
    if search.get("outcome"):
        rows.append(("search", search["outcome"]))
    if search.get("warning"):
        rows.append(("warning", search["warning"]))
    rows.append(
        ("time", "  ".join(f"{k.removesuffix('_s')} {v:.1f}s" for k, v in manifest["timings"].items()))
    )
    width = max(len(name) for name, _ in rows)
    table = [f"{name.ljust(width)}  {value}" for name, value in rows]
    return "\n".join(table + gate_lines(gate))


def model_card(manifest: dict[str, Any], base_model: str | None) -> str:
    """The README.md model card for the edited checkpoint."""
    evaluation = manifest.get("evaluation") or {}
    gate = manifest["gate"]
    header = ["---", "tags:", "- abliterated", "- abliterate", "- refusal-direction"]
    if base_model:
        header += [f"base_model: {base_model}", "base_model_relation: finetune"]
    header += ["---", ""]
    lines = [
        f"# {Path(base_model).name if base_model else 'Model'} (abliterated)",
        "",
        f"Made with [abliterate](https://pypi.org/project/abliterate/) {manifest['abliterate_version']} "
        f"from `{manifest['model']['source']}`.",
        "",
        "## Method",
        "",
        "The refusal direction r̂ (difference of mean residual streams on harmful vs harmless prompts at "
        "an end-of-instruction token, Arditi et al. 2024) was folded into every module that writes to the "
        "residual stream: `W ← W − r̂ r̂ᵀ W` for the embedding, attention output, MLP down projections and "
        "experts, and their biases. Tied embeddings were untied; the output head is unchanged.",
        "",
        f"- chosen layer: {manifest['direction']['layer']}",
        f"- chosen position: {manifest['direction']['position']} (from the end of the chat template)",
        f"- dtype: {manifest['model']['dtype']}",
        "",
        "## Proof (edited weights vs. the original with the direction ablated by hooks)",
        "",
        "The parity gate of abliterate checked this checkpoint before it was saved: a weight certificate",
        "(each edited tensor equals the fold of the original, every other tensor is bitwise unchanged),",
        "a completeness check of the writer list on real prompts, and logit parity against the hooked",
        "original (in 16-bit, against the model's measured rounding floor).",
        "",
        "```",
        *gate_lines(gate),
        "```",
        "",
    ]
    lines += _evaluation_lines(evaluation)
    lines += search_lines(manifest.get("search"))
    lines += [
        "This model will follow requests that the original refuses. Use it responsibly.",
        "",
        "`direction.safetensors` holds the direction; `abliterate.json` the full run manifest.",
        "",
    ]
    if manifest.get("weights", True) is not None:  # --direction-only writes no weights to verify
        lines += verify_lines()
    return "\n".join(header + lines)


def verify_lines() -> list[str]:
    """The card's section on checking the files: one command, reading everything from the output."""
    return [
        "## Verify",
        "",
        "In a local copy of this directory, or straight from the Hub (fetched at the commit verified):",
        "",
        "```",
        "abliterate verify DIR",
        "abliterate verify REPO_ID [--revision COMMIT]",
        "```",
        "",
        "It reads the base model (and its Hub revision, when recorded) from `abliterate.json` and the "
        "direction from `direction.safetensors`, then proves the weights are the declared edit of it "
        "(exit 0), or says what differs (exit 2).",
        "",
    ]


def apply_card(source: str, model_type: str, certificate: Any, base_model: object) -> str:
    """The README.md model card ``abliterate apply`` writes (never the source's own card).

    Args:
        source: the checkpoint the direction was folded into, as the user named it.
        model_type: the adapter's model type.
        certificate: the weight certificate of the written files, or ``None``.
        base_model: truthy when ``source`` is a Hub id to name as ``base_model``.
    """
    header = ["---", "tags:", "- abliterated", "- abliterate", "- refusal-direction"]
    if base_model:
        header += [f"base_model: {source}", "base_model_relation: finetune"]
    lines = [
        "---",
        "",
        f"# {Path(source).name} (abliterated)",
        "",
        f"Made with [abliterate](https://pypi.org/project/abliterate/) `apply` from `{source}` "
        f"(model type `{model_type}`): a saved refusal direction r̂ was folded into every residual writer, "
        "`W ← W − r̂ r̂ᵀ W`, tensor by tensor; every other tensor is copied unchanged.",
        "",
    ]
    if certificate is not None:
        lines += [
            "## Proof",
            "",
            "```",
            *gate_lines({"passed": certificate.passed, "certificate": certificate.to_dict()}),
            "```",
            "",
        ]
    lines += ["This model will follow requests that the original refuses. Use it responsibly.", ""]
    return "\n".join(header + lines + verify_lines())


def _evaluation_lines(evaluation: dict[str, Any]) -> list[str]:
    """The card's evaluation section (none without an evaluation)."""
    if not evaluation:
        return []
    before, after = evaluation["before"], evaluation["after"]
    return [
        "## Evaluation",
        "",
        "| | not helped (judge: refused or dodged) | refusal markers | n |",
        "|---|---|---|---|",
        f"| original | {_judged(before)} | {before['refusal_rate']:.1%} | {before['n']} |",
        f"| abliterated | {_judged(after)} | {after['refusal_rate']:.1%} | {after['n']} |",
        "",
        *_damage_lines(evaluation),
        "The judge is rules: on edited models it misses most dodges (answers to a neighbouring "
        "question), so the abliterated row is a lower bound (abliterate's BENCHMARKS.md §12b′).",
        "",
    ]


def _damage_lines(evaluation: dict[str, Any]) -> list[str]:
    """Over-refusal per set and the KLs, as far as the manifest has them (older ones: first-token KL only)."""
    lines = []
    for name, pair in evaluation.get("over_refusal", {}).items():
        before, after = pair["before"], pair["after"]
        lines.append(
            f"Over-refusal on {before['n']} {name} prompts (not helped): {before['not_helped_rate']:.1%} -> "
            f"{after['not_helped_rate']:.1%}; degenerate replies {before['degenerate_rate']:.1%} -> "
            f"{after['degenerate_rate']:.1%}."
        )
    lines.append(f"First-token KL on harmless prompts: {_fmt(evaluation['kl_harmless'])}.")
    if "multi_token_kl" in evaluation:
        damage = evaluation["multi_token_kl"]
        lines.append(
            f"KL over the original's own replies ({damage['n_tokens']} tokens of {damage['n_prompts']} "
            f"harmless prompts): {_fmt(damage['mean'])}."
        )
    return [line for text in lines for line in (text, "")]


def _judged(rates: dict[str, Any]) -> str:
    """The judge's refusal rate with its 95 % interval, or a dash for manifests without it."""
    if "judged_refusal_rate" not in rates:
        return "—"
    low, high = rates["judged_interval_95"]
    return f"{rates['judged_refusal_rate']:.1%} (95 % CI {low:.0%}–{high:.0%})"


def search_lines(search: dict[str, Any] | None) -> list[str]:
    """The model card's summary of the edit search: the outcome, the paper's point, the finalists."""
    if not search:
        return []
    lines = [
        "## Edit search",
        "",
        f"{search['trials']} cheap trials (Optuna TPE; first-token refusal score and KL on validation "
        f"prompts only), Pareto front of {search['front_size']} points (`pareto_front.json`, "
        "`pareto_front.png`). The paper's point and the finalists were confirmed on other validation "
        "prompts: long greedy replies read by the judge (not helped = refused or dodged), first-token KL "
        "and multi-token KL on harmless prompts. A searched point replaces the paper's only if it is "
        "lower on both KLs and not helped no more often (paired bootstrap, 95 % upper end ≤ +2 points).",
        "",
    ]
    if search.get("outcome"):
        lines += [f"**Outcome:** {search['outcome']}.", ""]
    if search.get("warning"):
        lines += [f"**Warning:** {search['warning']}.", ""]
    lines += [
        "| point | not helped (judge) | first-token KL | multi-token KL | embedding / attention / MLP "
        "strength | profile | status |",
        "|---|---|---|---|---|---|---|",
    ]
    chosen = search["chosen"]["point"]
    for index, trial in enumerate(search["confirmed"]):
        point = trial["point"]
        name = "paper rule" if index == 0 else "finalist"
        profile = "flat" if point["width"] <= 0 else f"peak {point['peak']:.1f}, width {point['width']:.1f}"
        judged = "—" if not trial["n_confirm"] else f"{trial['refusals']}/{trial['n_confirm']}"
        status = "**chosen**" if point == chosen else (trial.get("dropped") or "")
        lines.append(
            f"| {name}: layer {point['layer']:.2f}, pos {point['position']}"
            f"{', ⊥ harmless mean' if point['orthogonal'] else ''} | {judged} | {_fmt(trial['confirm_kl'])} "
            f"| {_fmt(trial.get('multi_kl'))} "
            f"| {point['embedding']:.2f} / {point['attention']:.2f} / {point['mlp']:.2f} | {profile} "
            f"| {status} |"
        )
    return [*lines, ""]
