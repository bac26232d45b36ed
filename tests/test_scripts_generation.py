"""The scripts' generation loop: a tqdm bar over the prompts; tokenizers' token_type_ids never reach generate."""

from __future__ import annotations

from helpers import tiny_llama
from test_scripts import _common, bert_tokenizer


def test_generate_texts_shows_progress_and_drops_token_type_ids(tmp_path, capsys):
    tokenizer = bert_tokenizer(tmp_path)  # a BERT tokenizer returns token_type_ids
    assert "token_type_ids" in tokenizer(["the movie"])
    prompts = ["the movie was", "a film is", "it was very", "the plot and", "good fun"]
    texts = _common.generate_texts(
        tiny_llama(), tokenizer, prompts, max_new_tokens=3, batch_size=2, progress=True
    )
    assert len(texts) == len(prompts)
    err = capsys.readouterr().err
    assert "Generating" in err and "5/5" in err
    _common.generate_texts(tiny_llama(), tokenizer, prompts[:2], max_new_tokens=2, progress=False)
    assert "Generating" not in capsys.readouterr().err
