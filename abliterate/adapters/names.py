"""How every family's models and checkpoints name things: text-model prefixes and attention modules.

Kept in one place so that the streamed apply (which matches on-disk names), the certificate (which
compares names without their prefixes) and the writer groups all read the same lists.
"""

from __future__ import annotations

# Where a checkpoint keeps a module that a plain causal LM holds under ``model.``: there
# (``model.layers.N``), in the text model of a multimodal wrapper as transformers 5 writes it
# (``model.language_model.layers.N``), and as older hub checkpoints hold it
# (``language_model.model.layers.N``).
TEXT_PREFIXES = ("model.", "model.language_model.", "language_model.model.")

# Every prefix the certificate strips before comparing names: the text prefixes, a wrapper's bare
# ``language_model.`` and GPT-2/GPT-J/Falcon's ``transformer.``. The first that matches is stripped, so
# the longest come first (``language_model.model.`` before ``language_model.``).
NAME_PREFIXES = tuple(
    sorted({*TEXT_PREFIXES, "language_model.", "transformer."}, key=lambda prefix: (-len(prefix), prefix))
)

# The module names attention blocks use, in memory and on disk.
ATTENTION_MODULES = ("self_attn", "attn", "attention", "self_attention")

# In a writer's on-disk alias, the place of an expert's index (``mlp.experts.*.down_proj.weight``).
EXPERT_INDEX = "*"
