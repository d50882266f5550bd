"""Make tests/data/llama3_mistral_tokenizer_ids.json: llama.cpp's token ids for the text set of
tests/llama3_mistral_vocab.py on the stored tiny Llama-3 and Mistral v3 vocabularies, each as
convert-weights embeds it (run by hand; the tests only read the JSON). See tests/data/README.md.

    PYTHONPATH=<llama-cpp-python sdist> LLAMA_CPP_LIB_PATH=<dir of libllama.so> \\
        python tests/data/make_tokenizer_reference.py
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import llama_cpp
from llama3_mistral_vocab import TEXTS, vocab_metadata
from tiny_model import TinySpec, write_tiny_model


def vocab_digest(md: dict) -> str:
    return hashlib.sha256(json.dumps(md, sort_keys=True).encode()).hexdigest()


def main() -> None:
    out = {"description": (
        "Token ids llama.cpp gives for each text (llama-cpp-python 0.3.36 on the libllama of its "
        "vendored llama.cpp, ggml 0c1e570: Llama(path, vocab_only=True).tokenize(text.encode(), "
        "add_bos, special)) on a tiny model file whose tokenizer.* metadata is what "
        "tests/llama3_mistral_vocab.py's vocab_metadata gives (its sha256 over the sorted JSON "
        "is vocab_sha256); eog: the ids llama.cpp marks end of generation "
        "(llama_vocab_is_eog over the vocabulary)."), "vocabularies": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("llama3", "mistral"):
            md = vocab_metadata(kind, Path(tmp) / kind)
            path = write_tiny_model(Path(tmp) / f"{kind}.gguf",
                                    TinySpec(n_vocab=len(md["tokenizer.ggml.tokens"])), md)
            llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
            vocab = llama_cpp.llama_model_get_vocab(llm.model)
            cases = {}
            for name, text in TEXTS.items():
                cases[name] = {
                    "text": text,
                    "ids_add_special_parse_special": llm.tokenize(text.encode(), True, True),
                    "ids_no_special": llm.tokenize(text.encode(), False, False),
                }
            out["vocabularies"][kind] = {
                "vocab_sha256": vocab_digest(md),
                "eog": [i for i in range(len(md["tokenizer.ggml.tokens"]))
                        if llama_cpp.llama_vocab_is_eog(vocab, i)],
                "cases": cases,
            }
    dst = Path(__file__).with_name("llama3_mistral_tokenizer_ids.json")
    dst.write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n")


if __name__ == "__main__":
    main()
