"""A GGUF file as the original of the weight certificate: its tensors dequantized, one at a time.

A run on a ``.gguf`` source loads it through transformers, which dequantizes every tensor with gguf-py,
undoes llama.cpp's layout changes (the Q/K row permutation of llama-family models, …) with its own
tensor processors and names the result as the model's parameters. ``GGUFSource`` repeats exactly that,
tensor by tensor, with transformers' own name map and processors (``modeling_gguf_pytorch_utils``), so
the certificate can compare the written checkpoint with the dequantized source without holding either
in memory: the GGUF is memory-mapped by ``GGUFReader`` and each tensor is dequantized when it is needed.

The run folds the dequantized float32 weights and casts the result once (``abliterate.model.gguf``), so the
source says ``cast_after_fold`` and the certificate recomputes the fold before the cast.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from abliterate.edit.kernel import changes
from abliterate.io.chunked import ChunkedReader
from abliterate.io.safetensors import TensorEntry

if TYPE_CHECKING:
    from collections.abc import Callable

    from abliterate.edit.declared import DeclaredEdit
    from abliterate.prove.structure import Structure

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Origin:
    """Where a saved tensor comes from: the GGUF tensors that feed it, the parameter they become, and
    (when saving renames or splits that parameter) the saved name it is under."""

    gguf_names: tuple[str, ...]
    parameter: str
    saved: str


def certificate_source(model: str) -> tuple[Path | GGUFSource | None, str]:
    """What the certificate reads a run's or ``verify``'s original from, or ``(None, why not)``.

    A ``.gguf`` file is read tensor by tensor (``GGUFSource``); anything else is the safetensors
    directory behind it (``sources.local_checkpoint``).
    """
    from abliterate.model.sources import local_checkpoint

    path = Path(model).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return GGUFSource.open(path)
    return local_checkpoint(model)


class GGUFSource:
    """The tensors of a GGUF file as transformers loads them, under the names ``save_pretrained`` gives.

    Attributes:
        path: the GGUF file.
        config: the model's config, as transformers builds it from the GGUF metadata.
        cast_after_fold: the run folds the dequantized float32 weights, then casts (see module docstring).
    """

    cast_after_fold = True

    def __init__(self, path: Path) -> None:
        """Read the GGUF's metadata and map each of its tensors to the saved tensor it becomes.

        Raises:
            ValueError: the file is not a GGUF transformers can load this way.
        """
        from gguf import GGUFReader
        from transformers import AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
            load_gguf_checkpoint,
            read_field,
        )
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        self.path = path
        self._reader = GGUFReader(str(path))  # memory-mapped: tensors are read when dequantized
        architecture = read_field(self._reader, "general.architecture")[0]
        _refuse_packed_path(architecture, path)
        parsed = load_gguf_checkpoint(str(path), return_tensors=False)
        # What ``AutoConfig.from_pretrained(gguf_file=…)`` builds from the same dict (a second metadata
        # parse would cost as much again: 15 s for the demo's 151k-token vocabulary).
        self.config = CONFIG_MAPPING[parsed["config"]["model_type"]].from_dict(dict(parsed["config"]))
        with torch.device("meta"):
            self._model = AutoModelForCausalLM.from_config(self.config)
        # The processor transformers uses for this architecture, with the same parsed config.
        self._processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed["config"])
        self._key_mapping = get_gguf_hf_weights_map(self._model, self._processor)
        self._tensors = {tensor.name: tensor for tensor in self._reader.tensors}
        self._entries, self._origins = self._index()
        self._group: tuple[tuple[str, ...], dict[str, torch.Tensor]] | None = None

    @classmethod
    def open(cls, path: Path) -> tuple[GGUFSource | None, str]:
        """``(source, "")``, or ``(None, why not)`` for an architecture this reader does not cover.

        Raises:
            ValueError: the file is not a GGUF transformers can load (gguf-py's reader raises
                ``IndexError`` for a truncated file).
        """
        try:
            return cls(path), ""
        except _NotCovered as error:
            return None, str(error)
        except (ValueError, IndexError, KeyError, NotImplementedError) as error:
            raise ValueError(f"cannot read {path} as a GGUF file: {error}") from error

    def __str__(self) -> str:
        return str(self.path)

    def _index(self) -> tuple[dict[str, TensorEntry], dict[str, _Origin]]:
        """Run every GGUF tensor through the processor on a zero stand-in of its shape (no dequantizing,
        one tensor's worth of memory at most) to learn which parameters it feeds, then map each parameter
        to its saved name(s) the way ``save_pretrained`` does."""
        sources: dict[str, list[str]] = {}
        for name, tensor in self._tensors.items():
            stand_in = np.lib.stride_tricks.as_strided(
                np.zeros(1, dtype=np.float32), shape=_logical_shape(tensor), strides=(0,) * len(tensor.shape)
            )
            for parameter in self._process(name, stand_in, {"tensors": {}}):
                sources.setdefault(parameter, []).append(name)
        state = dict(self._model.state_dict(keep_vars=True))
        entries: dict[str, TensorEntry] = {}
        origins: dict[str, _Origin] = {}
        for parameter, gguf_names in sources.items():
            if parameter not in state:
                continue  # transformers loads no such parameter either
            for saved, meta in _saved_form(self._model, parameter, state[parameter]).items():
                nbytes = meta.numel() * 4
                entries[saved] = TensorEntry(saved, "F32", tuple(meta.shape), 0, nbytes)
                origins[saved] = _Origin(tuple(gguf_names), parameter, saved)
        return entries, origins

    def _process(self, name: str, weights: np.ndarray, parsed: dict[str, dict]) -> dict[str, Any]:
        """The parameters one GGUF tensor becomes, as ``load_gguf_checkpoint`` computes them."""
        with np.errstate(all="ignore"):  # a processor's log(-w) on the zero stand-in
            result = self._processor.process(
                weights=weights, name=name, tensor_key_mapping=self._key_mapping, parsed_parameters=parsed
            )
        produced: dict[str, Any] = dict(parsed["tensors"])
        if result.name is not None and result.name in self._key_mapping:
            produced[self._key_mapping[result.name]] = result.weights
        return produced

    def index(self) -> dict[str, tuple[GGUFSource, TensorEntry]]:
        """Saved tensor name → ``(self, entry)``; entries are float32, as the run loads them."""
        return {name: (self, entry) for name, entry in self._entries.items()}

    def reader(self) -> _GGUFReader:
        """A ``ChunkedReader`` that reads this source's locations by dequantizing them."""
        return _GGUFReader(self)

    def tensor(self, name: str) -> torch.Tensor:
        """The saved tensor ``name``, dequantized to float32 (its own memory).

        Raises:
            ValueError: the processed tensor does not have the shape the model's config says.
        """
        origin = self._origins[name]
        if self._group is None or self._group[0] != origin.gguf_names:
            parsed: dict[str, dict] = {"tensors": {}}
            produced: dict[str, Any] = {}
            for gguf_name in origin.gguf_names:
                tensor = self._tensors[gguf_name]
                from gguf import dequantize

                produced.update(self._process(gguf_name, dequantize(tensor.data, tensor.tensor_type), parsed))
            value = produced[origin.parameter]
            value = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.array(value))
            saved = _saved_form(self._model, origin.parameter, value.to(torch.float32))
            self._group = (origin.gguf_names, saved)
        result = self._group[1][name]
        expected = self._entries[name].shape
        if tuple(result.shape) != expected:
            raise ValueError(f"{self.path}: {name} dequantizes to {list(result.shape)}, not {list(expected)}")
        return result.clone()  # the certificate folds in place

    def gguf_names(self, name: str) -> tuple[str, ...]:
        """The GGUF tensors the saved tensor ``name`` is computed from."""
        return self._origins[name].gguf_names

    def nbytes(self, name: str) -> int:
        """Bytes the GGUF stores for ``name`` (what reading it costs)."""
        return sum(int(self._tensors[g].n_bytes) for g in self._origins[name].gguf_names)

    def check_config(
        self, edited: Path, structure: Structure, declared: DeclaredEdit, fail: Callable[[str], None]
    ) -> None:
        """The edited ``config.json`` loads the GGUF's architecture, its head untied from an edited
        embedding."""
        from abliterate.adapters.tying import ties_embeddings
        from abliterate.io.safetensors import read_json

        after = read_json(edited / "config.json", "config.json")
        model_type = after.get("model_type")
        if model_type != self.config.model_type:
            fail(f"config.json: model_type {model_type!r} differs from the GGUF's {self.config.model_type!r}")
        if changes(declared.scales("embedding", -1)) and ties_embeddings(after, str(model_type)):
            fail(
                "config.json ties the output head to the edited embedding (tie_word_embeddings must be false)"
            )


class _GGUFReader(ChunkedReader):
    """``ChunkedReader`` whose reads of a ``GGUFSource`` location dequantize it; the edited checkpoint's
    safetensors locations are read as before."""

    def __init__(self, source: GGUFSource) -> None:
        super().__init__()
        self.source = source

    def tensor(self, location: tuple[Any, TensorEntry], fresh: bool = False) -> torch.Tensor:
        if location[0] is self.source:
            self.bytes_read += self.source.nbytes(location[1].name)
            return self.source.tensor(location[1].name)
        return super().tensor(location, fresh)

    def same_bytes(self, first: tuple[Any, TensorEntry], second: tuple[Any, TensorEntry]) -> bool:
        if first[0] is self.source:  # a float32 edited tensor against the dequantized float32 source
            return self.matches(self.tensor(first), second)
        return super().same_bytes(first, second)


def _logical_shape(tensor: Any) -> tuple[int, ...]:
    """The numpy shape gguf-py's ``dequantize`` gives a ``ReaderTensor`` (its ``ne`` reversed)."""
    return tuple(int(n) for n in reversed(tensor.shape.tolist()))


def _saved_form(model: torch.nn.Module, parameter: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{saved name: tensor}`` for one parameter, as ``save_pretrained`` converts it (fused experts may
    be saved per expert); the parameter itself when the model has no save-time conversion for it."""
    from transformers.core_model_loading import revert_weight_conversion

    try:
        reverted = revert_weight_conversion(model, {parameter: value})
    except Exception as error:  # transformers raises its own types here; structure._on_disk_names too
        logger.info("no save-time conversion for %s (%s): kept its in-memory name", parameter, error)
        return {parameter: value}
    return dict(reverted) or {parameter: value}


class _NotCovered(ValueError):
    """A GGUF transformers loads with other code than the legacy tensor processors this module reuses."""


def _refuse_packed_path(architecture: str, path: Path) -> None:
    """Architectures transformers loads through its packed-GGUF path convert with other code than the
    legacy processors read here: refuse them rather than certify against a different dequantization."""
    try:
        from transformers.integrations.gguf.utils import is_gguf_arch_supported
    except ImportError:
        return
    if is_gguf_arch_supported(architecture):
        raise _NotCovered(
            f"{path.name}: transformers loads GGUF architecture {architecture!r} through its packed path, "
            "which the certificate does not read yet"
        )
