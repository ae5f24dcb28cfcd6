"""The stages of ``abliterate run``, one module each; ``abliterate.pipeline.run`` is their sequence.

``subject`` (check the inputs, load the model) → ``finding`` (extract, select, search the direction) →
``evaluation`` (before and after the edit) → ``gating`` (parity reference, fold, check, certificate) →
``publishing`` (save, manifest and card, push).
"""
