"""Loading a base model from a folder or a GGUF file, as a plain model that `save_pretrained` can write.

Used by `id3 merge` and the example scripts. A GGUF-loaded transformers model refuses `save_pretrained`
(checkpoints would fail too), so GGUF weights are dequantized and copied into a model built from the config.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


def gguf_location(path: str | os.PathLike) -> tuple[str, str | None]:
    """(folder, gguf file name or None) for a model path: a `.gguf` file, or a folder holding one and no
    `config.json`; anything else (a folder or hub id) is returned with None.

    Example:
        >>> gguf_location("models/SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
        ('models', 'SmolLM2-135M-Instruct.Q4_1.gguf')
    """
    p = Path(path)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"no GGUF file at {p}")
        return str(p.parent), p.name
    if p.is_dir() and not (p / "config.json").is_file():
        files = sorted(p.glob("*.gguf"))
        if len(files) == 1:
            return str(p), files[0].name
        if len(files) > 1:
            raise ValueError(f"{p} holds {len(files)} .gguf files; name one: {p / files[0].name}")
    return str(path), None


def dtype_kwarg(dtype: torch.dtype) -> dict:
    """`{"dtype": dtype}`, or `{"torch_dtype": dtype}` for transformers before 4.56 (which only knows that)."""
    import transformers
    from packaging.version import Version

    return {"dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype": dtype}


def load_plain_model(
    path: str | os.PathLike,
    model_class: str | None = None,
    gguf_file: str | None = None,
    dtype: torch.dtype = torch.float32,
    **kwargs,
):
    """`from_pretrained` of `path` with the class named in its config (or `model_class`, e.g.
    "AutoModelForSequenceClassification"); GGUF weights are dequantized into a plain model.

    Example:
        >>> model = load_plain_model("base-folder")  # doctest: +SKIP
    """
    import transformers
    from transformers import AutoConfig

    if gguf_file is None:
        path, gguf_file = gguf_location(path)
    gguf = {"gguf_file": gguf_file} if gguf_file else {}
    dtype_kw = dtype_kwarg(dtype)
    if model_class is None:
        config = AutoConfig.from_pretrained(path, **gguf)
        architectures = getattr(config, "architectures", None) or []
        model_class = architectures[0] if architectures else "AutoModelForCausalLM"
    cls = getattr(transformers, model_class, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ValueError(f"transformers has no model class {model_class!r} (e.g. AutoModelForCausalLM).")
    loaded = cls.from_pretrained(path, **dtype_kw, **gguf, **kwargs)
    if not gguf_file:
        return loaded
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(loaded)._from_config(config, **dtype_kw)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    return plain
