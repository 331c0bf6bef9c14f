"""The tokenizer the data pipeline and the evaluations use: a thin wrapper over SentencePiece.

Llama-family models ship a SentencePiece ``tokenizer.model``; we encode with SentencePiece
itself, because that is the reference the model was trained with (the Hugging Face
conversion of a SentencePiece BPE model differs from it on some whitespace runs).
A Hugging Face tokenizer directory without ``tokenizer.model`` (only ``tokenizer.json``) is
served by the ``tokenizers`` library instead.

Text is data: ``encode`` never adds BOS/EOS and never turns a literal ``</s>`` inside a
document into the EOS id; the data pipeline adds the special ids itself. EOS is required;
BOS is not: Qwen2's tokenizer has none (``bos_token: null``), and ``bos_id`` is then None.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import sentencepiece as spm

SPECIAL_TOKENS_MAP = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


class Tokenizer:
    """Encodes text to ids without special tokens; picklable (worker processes get a copy)."""

    def __init__(
        self,
        *,
        sp_model_proto: bytes | None = None,
        hf_tokenizer_json: str | None = None,
        hf_config: dict[str, Any] | None = None,
        num_threads: int = 1,
    ):
        """Use :func:`load_tokenizer`; exactly one of ``sp_model_proto`` / ``hf_tokenizer_json``.

        ``num_threads`` is SentencePiece's thread count in :meth:`encode_batch`; 1 by default
        because the data pipeline parallelises over worker processes, not threads.
        """
        if sp_model_proto is not None and hf_tokenizer_json is not None:
            raise ValueError("give exactly one of sp_model_proto or hf_tokenizer_json")
        self._load(sp_model_proto, hf_tokenizer_json, hf_config, num_threads)

    def _load(
        self,
        sp_model_proto: bytes | None,
        hf_tokenizer_json: str | None,
        hf_config: dict[str, Any] | None,
        num_threads: int,
    ) -> None:
        self.num_threads = num_threads
        self._sp: spm.SentencePieceProcessor | None = None
        self._hf: Any = None
        self._hf_json = hf_tokenizer_json
        self._hf_config = hf_config or {}
        if sp_model_proto is not None:
            self._sp = spm.SentencePieceProcessor()
            self._sp.LoadFromSerializedProto(sp_model_proto)
            self.bos_id: int | None = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
            self.eos_id = self._sp.eos_id()
            if self.eos_id < 0:
                raise ValueError(
                    "the SentencePiece model has no EOS id; the data pipeline needs one"
                )
            self.vocab_size = self._sp.vocab_size()
        elif hf_tokenizer_json is not None:
            from tokenizers import Tokenizer as HFTokenizer

            self._hf = HFTokenizer.from_str(hf_tokenizer_json)
            # Special-token strings inside a document are text, not control tokens.
            self._hf.encode_special_tokens = True
            # bos_token null or absent (Qwen2): no BOS; documents are separated by EOS alone.
            has_bos = self._hf_config.get("bos_token") is not None
            self.bos_id = self._special_id("bos_token") if has_bos else None
            self.eos_id = self._special_id("eos_token")
            self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
        else:
            raise ValueError("give exactly one of sp_model_proto or hf_tokenizer_json")

    def _special_id(self, key: str) -> int:
        token = self._hf_config.get(key)
        if isinstance(token, dict):  # older configs store AddedToken dicts
            token = token.get("content")
        tid = self._hf.token_to_id(token) if token else None
        if tid is None:
            raise ValueError(
                f"tokenizer_config.json's {key} ({token!r}) is missing or not in "
                "tokenizer.json's vocabulary; fix tokenizer_config.json"
            )
        return tid

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without BOS/EOS."""
        if self._sp is not None:
            return self._sp.encode(text)
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]`` in one call into the native library."""
        if self._sp is not None:
            return self._sp.encode(texts, num_threads=self.num_threads)
        return [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` (for logs and debugging)."""
        if self._sp is not None:
            return self._sp.decode(ids)
        return self._hf.decode(ids)

    def save_pretrained(self, out_dir: str) -> None:
        """Write a Hugging Face tokenizer directory that ``AutoTokenizer`` loads.

        From SentencePiece it holds ``tokenizer.model`` (which :func:`load_tokenizer` prefers,
        so ids round-trip exactly), ``tokenizer.json`` converted by transformers, and a
        LlamaTokenizer config with add_bos_token like Llama-2.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self._hf_json is not None:
            (out / "tokenizer.json").write_text(self._hf_json)
            (out / "tokenizer_config.json").write_text(json.dumps(self._hf_config, indent=2))
            return
        from transformers import AutoTokenizer

        assert self._sp is not None
        with tempfile.TemporaryDirectory() as tmp:
            # transformers converts tokenizer.model -> tokenizer.json when it loads a directory
            # holding only the SentencePiece file and a LlamaTokenizer config.
            src = Path(tmp)
            (src / "tokenizer.model").write_bytes(self._sp.serialized_model_proto())
            config = {
                "tokenizer_class": "LlamaTokenizer",
                "add_bos_token": True,
                "add_eos_token": False,
                "legacy": True,
                "clean_up_tokenization_spaces": False,
                "model_max_length": 1_000_000,
                **SPECIAL_TOKENS_MAP,
            }
            (src / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
            (src / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS_MAP))
            hf = AutoTokenizer.from_pretrained(str(src))
            hf.save_pretrained(str(out))
            for name in ("tokenizer.model", "special_tokens_map.json"):
                shutil.copyfile(src / name, out / name)

    def __getstate__(self) -> dict[str, Any]:
        if self._sp is not None:
            return {"sp": self._sp.serialized_model_proto(), "threads": self.num_threads}
        return {"hf": self._hf_json, "config": self._hf_config, "threads": self.num_threads}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._load(state.get("sp"), state.get("hf"), state.get("config"), state["threads"])


def load_tokenizer(path: str, num_threads: int = 1) -> Tokenizer:
    """Load a SentencePiece ``.model`` file or a Hugging Face tokenizer directory.

    A directory with ``tokenizer.model`` (e.g. a Llama-2 checkpoint) is read with SentencePiece;
    otherwise its ``tokenizer.json`` + ``tokenizer_config.json`` are used.
    """
    p = Path(path)
    if p.is_file():
        return Tokenizer(sp_model_proto=p.read_bytes(), num_threads=num_threads)
    if not p.is_dir():
        raise FileNotFoundError(f"tokenizer {path!r}: no such file or directory")
    if (p / "tokenizer.model").is_file():
        return Tokenizer(
            sp_model_proto=(p / "tokenizer.model").read_bytes(), num_threads=num_threads
        )
    if (p / "tokenizer.json").is_file():
        config_path = p / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        special_path = p / "special_tokens_map.json"
        if special_path.is_file():
            config = {**json.loads(special_path.read_text()), **config}
        return Tokenizer(
            hf_tokenizer_json=(p / "tokenizer.json").read_text(),
            hf_config=config,
            num_threads=num_threads,
        )
    raise FileNotFoundError(
        f"tokenizer {path!r}: directory has neither tokenizer.model nor tokenizer.json"
    )
