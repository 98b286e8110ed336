"""A model folder for benchmarks with dummy weights: a real config.json plus, optionally, a
synthetic word-level tokenizer covering the whole vocabulary (token i <-> "<ti>"), so that
`pagoda serve --load-format dummy` can stream text for any token id the model samples.

    python -m pagoda.benchmarks.dummy_model benchmarks/model_configs/llama-3.1-8b.json /tmp/l8
    pagoda serve /tmp/l8 --load-format dummy
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from typing import Optional

_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}assistant:{% endif %}")


def _first(value) -> Optional[int]:
    if isinstance(value, list):
        return value[0] if value else None
    return value


def make_dummy_tokenizer(folder: str, vocab_size: int, eos_token_id: Optional[int] = None,
                         bos_token_id: Optional[int] = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {f"<t{i}>": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<t0>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins with spaces
    names = {}
    if eos_token_id is not None and eos_token_id < vocab_size:
        names["eos_token"] = f"<t{eos_token_id}>"
        names["pad_token"] = f"<t{eos_token_id}>"
    if bos_token_id is not None and bos_token_id < vocab_size:
        names["bos_token"] = f"<t{bos_token_id}>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **names)
    fast.chat_template = _CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return fast


def make_dummy_model_dir(config_path: str, folder: str, tokenizer: bool = True) -> str:
    os.makedirs(folder, exist_ok=True)
    shutil.copyfile(config_path, os.path.join(folder, "config.json"))
    if tokenizer:
        with open(config_path) as f:
            config = json.load(f)
        text = config.get("text_config", config)
        make_dummy_tokenizer(folder, text["vocab_size"], _first(config.get("eos_token_id")),
                             _first(config.get("bos_token_id")))
    return folder


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="a config.json (e.g. benchmarks/model_configs/*.json)")
    parser.add_argument("folder", help="the model folder to write")
    parser.add_argument("--no-tokenizer", action="store_true")
    args = parser.parse_args(argv)
    print(make_dummy_model_dir(args.config, args.folder, not args.no_tokenizer))


if __name__ == "__main__":
    main()
