"""Regexes for using ID3 inside `peft` adapters (LoRA, IA3) rather than on the base weights.

`get_peft_model` freezes the base model, so ID3's default selection (every trainable parameter) already
selects inside the adapters, plus whatever else peft left trainable: `modules_to_save` copies (a new
classifier head) and, with `bias="lora_only"/"all"`, biases. These helpers make the choice explicit.

Example:
    >>> config = ID3Config(budget=2000, include=lora_include(), dense=MODULES_TO_SAVE)
"""

from __future__ import annotations

#: peft's trainable copies of `modules_to_save` (e.g. the classifier of a SEQ_CLS model): train them fully.
MODULES_TO_SAVE = r"\.modules_to_save\."


def lora_include() -> str:
    """`ID3Config.include` regex matching LoRA's A and B matrices only (embedding LoRA too).

    Example:
        >>> import re
        >>> bool(re.search(lora_include(), "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.default.weight"))
        True
        >>> bool(re.search(lora_include(), "base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.bias"))
        False
    """
    return r"\.lora_(?:embedding_)?[AB]\."


def ia3_include() -> str:
    """`ID3Config.include` regex matching IA3's scaling vectors only.

    Example:
        >>> import re
        >>> bool(re.search(ia3_include(), "base_model.model.bert.encoder.layer.0.attention.self.key.ia3_l.default"))
        True
    """
    return r"\.ia3_l\."
