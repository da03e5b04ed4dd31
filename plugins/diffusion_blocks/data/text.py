"""Text data for the LMs: byte-level tokenizers (with BOS/EOS for the autoregressive
LM; `char`, without, for character-level masked diffusion), a generated corpus that
needs no network (and held-out sentences of the same grammar), and local text/JSONL
files (by paragraph, or `text_chars`: every character in order), all served by
torchtitan's own HF text dataset and dataloader (we only add entries to its DATASETS
registry)."""

import codecs
import json
import os
import random
from pathlib import Path

from datasets import Dataset, load_dataset
from torchtitan.components.tokenizer import BaseTokenizer, build_hf_tokenizer
from torchtitan.hf_datasets import DatasetConfig
from torchtitan.hf_datasets.text_datasets import DATASETS

from ..errors import ConfigError, origin_of


class ByteTokenizer(BaseTokenizer):
    """UTF-8 bytes 0..255, BOS = 256, EOS = 257."""

    def __init__(self):
        super().__init__()
        self.bos_id, self.eos_id = 256, 257

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", "replace")

    def get_vocab_size(self) -> int:
        return 258


class CharTokenizer(ByteTokenizer):
    """UTF-8 bytes 0..255 and nothing else: no BOS / EOS, so a text is one unbroken
    stream of its characters (one token per character of ASCII text: text8,
    tinyshakespeare). The character-level data of the masked-diffusion LM."""

    def __init__(self):
        super().__init__()
        self.bos_id = self.eos_id = None

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def get_vocab_size(self) -> int:
        return 256


TOKENIZERS = {
    "byte": lambda job_config: ByteTokenizer(),
    "char": lambda job_config: CharTokenizer(),
}


def build_hf_tokenizer_checked(job_config) -> BaseTokenizer:
    """torchtitan's Hugging Face tokenizer; a missing folder is a one-line error."""
    path = job_config.model.hf_assets_path
    if not os.path.isfile(os.path.join(path, "tokenizer.json")) and not os.path.isdir(path):
        raise ConfigError(
            f"{origin_of(job_config, 'model', 'hf_assets_path')}: the Hugging Face "
            f"tokenizer is read from [model] hf_assets_path = {path!r}, which does not "
            "exist; point it at a folder with tokenizer.json (or set [data] tokenizer = 'byte')"
        )
    return build_hf_tokenizer(job_config)


def build_tokenizer(job_config, default=None) -> BaseTokenizer:
    """`[data] tokenizer`: 'auto' = the train spec's own (`default`: the HF tokenizer
    for a stock torchtitan llama3 model, bytes for dblocks_llama3), 'byte', or 'hf'
    (torchtitan's tokenizer at [model] hf_assets_path)."""
    name = job_config.data.tokenizer
    if name == "auto":
        return default(job_config) if default is not None else ByteTokenizer()
    if name == "hf":
        return build_hf_tokenizer_checked(job_config)
    return TOKENIZERS[name](job_config)


# ---------------------------------------------------------------------------
# A generated corpus: simple English-like sentences from a small grammar, so the
# default job trains on real structure without downloads.

_SUBJECTS = ["the cat", "a dog", "the old king", "my friend", "the small bird",
             "a young girl", "the farmer", "the tired horse", "our teacher", "the fox"]
_VERBS = ["sees", "finds", "likes", "follows", "watches", "helps", "calls", "meets"]
_OBJECTS = ["the red ball", "a green tree", "the river", "an old house", "the moon",
            "a quiet garden", "the bright star", "a long road", "the market"]
_ENDINGS = ["in the morning", "at night", "near the hill", "every day", "with joy",
            "after the rain", "before dinner"]


def synthetic_sentences(num_lines: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        sentence = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
        if rng.random() < 0.5:
            sentence += " " + rng.choice(_ENDINGS)
        lines.append(sentence + ".")
    return lines


def _load_synthetic(path: str):
    return Dataset.from_dict({"text": synthetic_sentences(20_000)})


# our datasets whose dataset_path names a local file: what it must be
LOCAL_TEXT_DATASETS = {
    "text_file": "a .txt file (split into paragraphs) or a .jsonl file with a 'text' field",
    "text_chars": "a UTF-8 text file (its characters, every one in order)",
}
JSON_SUFFIXES = (".jsonl", ".json")


def _load_synthetic_heldout(path: str):
    """Other sentences from the same grammar (another seed): held-out data that needs
    no file."""
    return Dataset.from_dict({"text": synthetic_sentences(2_000, seed=1)})


def _load_text_file(path: str):
    if not path:
        raise ConfigError(
            "[training] dataset = 'text_file' needs [training] dataset_path: "
            + LOCAL_TEXT_DATASETS["text_file"]
        )
    if not Path(path).is_file():
        raise ConfigError(f"[training] dataset_path {path!r} is not a file")
    check_text_file(path)
    if path.endswith(JSON_SUFFIXES):
        check_json_records(path)
        return load_dataset("json", data_files=path, split="train")
    return load_dataset("text", data_files=path, sample_by="paragraph", split="train")


def check_text_file(path: str, chunk_bytes: int = 1 << 20) -> None:
    """Refuse a file that would train on nothing or on garbage, naming it: empty,
    whitespace only, binary (NUL bytes) or not UTF-8. Streams the file in chunks."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, has_text = 0, False
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            nul = chunk.find(b"\0")
            if nul >= 0:
                raise ConfigError(
                    f"dataset file {path} looks binary, not text (a NUL byte at byte "
                    f"{offset + nul}); give a UTF-8 .txt or .jsonl file"
                )
            pending = len(decoder.getstate()[0])
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as e:
                at = offset - pending + e.start
                raise ConfigError(
                    f"dataset file {path} is not UTF-8 text (byte {at}: {e.object[e.start:e.start + 4]!r}); "
                    "convert it, e.g. iconv -f latin1 -t utf-8"
                ) from None
            has_text = has_text or not (text.isspace() or text == "")
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise ConfigError(
                f"dataset file {path} is not UTF-8 text (it ends inside a multi-byte character)"
            ) from None
    if offset == 0:
        raise ConfigError(f"dataset file {path} is empty")
    if not has_text:
        raise ConfigError(f"dataset file {path} holds only whitespace ({offset} bytes), no text")


def check_json_records(path: str) -> None:
    """A .jsonl (one JSON object per line) or .json (that, or one list of objects) file:
    every record must be an object with a string 'text' field, some of it not blank."""
    with open(path, encoding="utf-8") as f:
        content = f.read()
    if path.endswith(".json") and content.lstrip().startswith("["):
        try:
            records = list(enumerate(json.loads(content), 1))
        except json.JSONDecodeError as e:
            raise ConfigError(f"dataset file {path} is not valid JSON ({e})") from None
        where = "record"
    else:
        records = []
        for number, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((number, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ConfigError(
                    f"dataset file {path}: line {number} is not valid JSON ({e.msg}, column {e.colno})"
                ) from None
        where = "line"
    has_text = False
    for number, record in records:
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            found = f"keys {sorted(record)}" if isinstance(record, dict) else type(record).__name__
            raise ConfigError(
                f"dataset file {path}: {where} {number} has no string 'text' field ({found})"
            )
        has_text = has_text or bool(text.strip())
    if not has_text:
        raise ConfigError(f"dataset file {path}: every 'text' field is empty or whitespace")


CHARS_CHUNK = 4096  # characters per sample of `text_chars`; the stream is the same


def _load_text_chars(path: str):
    """A text file's characters, every one of them in order (line and paragraph breaks
    kept), as consecutive chunks: with the `char` tokenizer the token stream is the
    file itself."""
    if not path:
        raise ConfigError(
            "[training] dataset = 'text_chars' needs [training] dataset_path (and "
            "[validation] dataset_path for held-out text): "
            + LOCAL_TEXT_DATASETS["text_chars"]
        )
    if not Path(path).is_file():
        raise ConfigError(f"dataset_path {path!r} is not a file")
    check_text_file(path)
    text = Path(path).read_text(encoding="utf-8")
    return Dataset.from_dict(
        {"text": [text[i:i + CHARS_CHUNK] for i in range(0, len(text), CHARS_CHUNK)]}
    )


def _text_field(sample) -> str:
    return sample["text"]


def register_text_datasets() -> None:
    DATASETS.setdefault(
        "synthetic_text",
        DatasetConfig(path="generated", loader=_load_synthetic, sample_processor=_text_field),
    )
    DATASETS.setdefault(
        "text_file",
        DatasetConfig(path="", loader=_load_text_file, sample_processor=_text_field),
    )
    DATASETS.setdefault(
        "synthetic_text_heldout",
        DatasetConfig(path="generated", loader=_load_synthetic_heldout,
                      sample_processor=_text_field),
    )
    DATASETS.setdefault(
        "text_chars",
        DatasetConfig(path="", loader=_load_text_chars, sample_processor=_text_field),
    )
