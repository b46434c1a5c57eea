"""The UMT5 tokenizer of Wan, on sentencepiece.

Behaves as the official ``HuggingfaceTokenizer('google/umt5-xxl', seq_len=512,
clean='whitespace')``: clean the text, encode, append EOS (id 1), truncate to 511 tokens +
EOS (HF ``truncation=True`` keeps the EOS), pad with id 0 to 512, mask 1 on real tokens.

Cleaning differs in one respect: the official code runs ``ftfy.fix_text`` first, and ftfy
is not a dependency. Its most common effect on prompts, straightening curly quotes and
apostrophes, is reproduced; its repair of mojibake (UTF-8 read as Latin-1, e.g. "cafÃ©") and
of C1 control characters is not. NFKC folding (ligatures, full-width forms) is done by the
sentencepiece model's own normaliser, as in the HF tokenizer.
"""
from __future__ import annotations

import html
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import sentencepiece as spm
import torch

from .t5 import TEXT_LEN

_SINGLE_QUOTES = re.compile("[\u02bc\u2018-\u201b]")  # the sets ftfy's uncurl_quotes straightens
_DOUBLE_QUOTES = re.compile("[\u201c-\u201f]")
_SPIECE_KEY = "spiece_model"  # uint8 tensor in Comfy-Org text-encoder files
_BESIDE = ("spiece.model", "tokenizer.model", "tokenizer.json")
_FOLDERS = (".", "tokenizer", "google/umt5-xxl")  # diffusers and official Wan folder layouts


def clean_text(text: str) -> str:
    """Wan's 'whitespace' cleaning (without ftfy, see the module docstring)."""
    text = _DOUBLE_QUOTES.sub('"', _SINGLE_QUOTES.sub("'", text))
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class UMT5Tokenizer:
    """Prompts -> (ids [B, seq_len] int64, mask [B, seq_len] int64)."""

    def __init__(self, encode: Callable[[str], list[int]], eos_id: int, pad_id: int,
                 seq_len: int = TEXT_LEN):
        self._encode = encode
        self.eos_id, self.pad_id, self.seq_len = eos_id, pad_id, seq_len

    def __call__(self, texts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = torch.full((len(texts), self.seq_len), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, text in enumerate(texts):
            tokens = self._encode(clean_text(text))[: self.seq_len - 1] + [self.eos_id]
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        return ids, mask


def tokenizer_from_bytes(model: bytes, seq_len: int = TEXT_LEN) -> UMT5Tokenizer:
    """Tokenizer from a serialized SentencePiece ModelProto (``spiece.model`` contents)."""
    try:
        sp = spm.SentencePieceProcessor(model_proto=bytes(model))
    except (RuntimeError, TypeError, OSError) as err:  # sentencepiece's own parse error text
        raise ValueError(f"its sentencepiece tokenizer ({len(model):,} bytes) is not a valid "
                         "sentencepiece model") from err
    if sp.eos_id() < 0 or sp.pad_id() < 0:
        raise ValueError("sentencepiece model has no EOS or no PAD id: not a T5 tokenizer")
    # Literal special-token text ("</s>", "<pad>", "<unk>") becomes that token, as in the HF
    # tokenizer; sentencepiece alone would spell it out.
    specials = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())
                if sp.is_control(i) or sp.is_unknown(i)}
    split = re.compile("(" + "|".join(map(re.escape, specials)) + ")")

    def encode(text: str) -> list[int]:
        out: list[int] = []
        for part in split.split(text):
            out += [specials[part]] if part in specials else sp.encode(part) if part else []
        return out

    return UMT5Tokenizer(encode, sp.eos_id(), sp.pad_id(), seq_len)


def tokenizer_from_json(text: str, seq_len: int = TEXT_LEN) -> UMT5Tokenizer:
    """Tokenizer from a HF ``tokenizer.json`` (needs the ``tokenizers`` package, as ComfyUI has)."""
    from tokenizers import Tokenizer  # lazy: only this path needs it

    try:
        tok = Tokenizer.from_str(text)
    except Exception as err:  # tokenizers raises its own Exception subclass
        raise ValueError("its tokenizer.json is not a valid tokenizers file") from err
    tok.no_padding()  # a saved file may carry padding / truncation settings; we do our own
    tok.no_truncation()
    eos, pad = tok.token_to_id("</s>"), tok.token_to_id("<pad>")
    if eos is None or pad is None:
        raise ValueError("tokenizer.json has no </s> or <pad> token: not a T5 tokenizer")
    return UMT5Tokenizer(lambda t: tok.encode(t, add_special_tokens=False).ids, eos, pad, seq_len)


def load_tokenizer(text_encoder_path: str | Path, seq_len: int = TEXT_LEN) -> UMT5Tokenizer:
    """The tokenizer that goes with a text-encoder file.

    Looks for a ``spiece_model`` tensor inside the file (safetensors), then for
    ``spiece.model`` / ``tokenizer.model`` / ``tokenizer.json`` beside it, in a ``tokenizer/``
    folder beside it, or in ``google/umt5-xxl/`` (the official Wan checkpoint folder).
    """
    path = Path(text_encoder_path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            if _SPIECE_KEY in f.keys():
                return tokenizer_from_bytes(f.get_tensor(_SPIECE_KEY).numpy().tobytes(), seq_len)
    candidates = [path.parent / folder / name for folder in _FOLDERS for name in _BESIDE]
    for candidate in candidates:
        if candidate.is_file():
            if candidate.suffix == ".json":
                return tokenizer_from_json(candidate.read_text(encoding="utf-8"), seq_len)
            return tokenizer_from_bytes(candidate.read_bytes(), seq_len)
    raise FileNotFoundError(
        f"no UMT5 tokenizer for {path}: the file has no '{_SPIECE_KEY}' tensor and none of "
        f"{', '.join(str(c.relative_to(path.parent)) for c in candidates)} exists beside it")
