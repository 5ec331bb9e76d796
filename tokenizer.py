"""Tokenizers: a tiktoken Encoding rebuilt from a checkpoint's own byte-level BPE vocabulary.

Byte-level BPE vocabularies (GPT-2, SmolLM2, Llama 3, Qwen2) store each token as a string in
GPT-2's byte-to-unicode alphabet. Decoding that alphabet gives the token's bytes; the token id is
its tiktoken rank, which is valid when ids grow with merge order (checked). The pre-tokenizer regex
is what splits text into pieces before BPE; it must match the checkpoint's, or ids drift.
The spec (a plain dict) is stored inside every checkpoint, so nothing is downloaded at run time.
"""

import re

import regex
import tiktoken

import cli

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# SmolLM2 (and StarCoder) run Digits(individual_digits=True) before the GPT-2 regex. In one regex:
# every digit is its own piece, and a whitespace run right before a digit is one piece (in the
# two-stage original it ends a segment, where \s+(?!\S) takes the whole run).
SMOLLM_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
GGUF_PRE_PATTERNS = {"smollm": SMOLLM_PATTERN, "gpt-2": GPT2_PATTERN, "llama-bpe": LLAMA3_PATTERN,
                     "qwen2": QWEN2_PATTERN}


def byte_spec() -> dict:
    """A byte tokenizer with no merges: ids 0..255 are the bytes, 256 is end-of-text. For models
    trained from scratch on synthetic data, and for tests."""
    return make_spec("bytes", [], {"<|endoftext|>": 256}, GPT2_PATTERN, eos_id=256) | {
        "pieces": [bytes([b]) for b in range(256)] + [None]}


def byte_level_alphabet() -> dict:
    """GPT-2's map from each of the 256 bytes to a printable unicode character, inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:  # unprintable bytes are shifted past 255, in byte order
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def pattern_from_hf(pre_tokenizer: dict) -> str:
    """The split regex equivalent to a tokenizer.json "pre_tokenizer" entry."""
    kind = (pre_tokenizer or {}).get("type")
    steps = pre_tokenizer.get("pretokenizers", []) if kind == "Sequence" else [pre_tokenizer or {}]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return GPT2_PATTERN
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return SMOLLM_PATTERN
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        return steps[0]["pattern"]["Regex"]
    raise cli.BadInput(f"unsupported pre-tokenizer {kinds} in tokenizer.json; supported: ByteLevel (GPT-2), "
                     "Digits+ByteLevel (SmolLM2), Split+ByteLevel (Llama 3, Qwen2)")


def make_spec(name, tokens, special, pattern, bos_id=None, eos_id=None, chat_template=None) -> dict:
    """Tokenizer spec from byte-level token strings (index = id) and special tokens {text: id}.
    Tokens outside the byte-level alphabet are taken as special (added) tokens."""
    alphabet = byte_level_alphabet()
    pieces = [None] * len(tokens)
    special = dict(special)
    for i, tok in enumerate(tokens):
        if tok in special or special.get(tok) == i:
            continue
        if all(c in alphabet for c in tok):
            pieces[i] = bytes(alphabet[c] for c in tok)
        else:
            special[tok] = i
    return {"name": name, "pattern": pattern, "pieces": pieces, "special": special,
            "bos_id": bos_id, "eos_id": eos_id, "chat_template": chat_template}


def check_merge_order(spec: dict, merges: list):
    """tiktoken merges by rank = id; that equals BPE merge order only if ids grow with merges."""
    ids = {p: i for i, p in enumerate(spec["pieces"]) if p is not None}
    alphabet = byte_level_alphabet()
    last = -1
    for m in merges:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        merged = bytes(alphabet[c] for c in a + b)
        if merged not in ids or ids[merged] <= last:
            raise cli.BadInput(f"merge {m!r} is out of id order; this vocabulary cannot be expressed as "
                             "a tiktoken encoding (ranks must follow merge order)")
        last = ids[merged]


def _chars_led_by(b: int):
    """Regex class items for the characters whose UTF-8 encoding starts with byte b."""
    if b < 0x80:
        return [re.escape(chr(b))]
    for lo, hi, mask, shift in ((0xC2, 0xDF, 0x1F, 6), (0xE0, 0xEF, 0x0F, 12), (0xF0, 0xF4, 0x07, 18)):
        if lo <= b <= hi:
            start = (b & mask) << shift
            return [f"\\U{start:08x}-\\U{start + (1 << shift) - 1:08x}"]
    if 0x80 <= b <= 0xBF:
        raise cli.BadInput(f"vocabulary lacks the continuation byte {b:#x}; such a tokenizer is not supported")
    return []  # 0xC0, 0xC1, 0xF5-0xFF never occur in UTF-8


class Tokenizer:
    """encode/decode with tiktoken. Bytes the vocabulary lacks are dropped inside each pre-tokenizer
    piece, after the text is split, as the Hugging Face BPE drops them (tiktoken would panic). The
    SmolLM2 vocabulary lacks 21 byte values: six ASCII control bytes (0x04 0x06 0x13 0x14 0x16 0x1d),
    the lead bytes 0xF1 and 0xF2 of U+40000-U+BFFFF (dropped alone: the character's continuation
    bytes stay, as in HF), and 0xC0 0xC1 0xF5-0xFF, which UTF-8 never uses. dropped() counts the
    characters that lose a byte, so callers can say so."""

    def __init__(self, spec: dict):
        self.spec = spec
        ranks = {p: i for i, p in enumerate(spec["pieces"]) if p is not None}
        self.enc = tiktoken.Encoding(name=spec["name"], pat_str=spec["pattern"], mergeable_ranks=ranks,
                                     special_tokens=spec["special"])
        self.missing = frozenset(range(256)) - {p[0] for p in ranks if len(p) == 1}
        items = [item for b in sorted(self.missing) for item in _chars_led_by(b)]
        self.unencodable = re.compile("[" + "".join(items) + "]") if items else None  # characters that lose a byte
        self.splitter = regex.compile(spec["pattern"])  # the pre-tokenizer tiktoken runs, for the slow path
        self.bos_id, self.eos_id = spec["bos_id"], spec["eos_id"]
        self.n_vocab = len(spec["pieces"])

    def encode(self, text: str) -> list:
        """Plain text to ids; special-token text is encoded as ordinary text, never as a control id.
        Text with a byte the vocabulary lacks is split here, and each piece's remaining bytes go to
        BPE alone (tiktoken's single-piece encoder: no second split)."""
        if self.unencodable is None or not self.unencodable.search(text):
            return self.enc.encode_ordinary(text)
        ids = []
        for piece in self.splitter.findall(text):
            kept = bytes(b for b in piece.encode("utf-8") if b not in self.missing)
            if kept:
                ids += self.enc._encode_single_piece(kept)
        return ids

    def dropped(self, text: str) -> int:
        """How many characters of text lose a byte the vocabulary lacks."""
        return 0 if self.unencodable is None else len(self.unencodable.findall(text))

    def decode(self, ids) -> str:
        return self.enc.decode(list(ids), errors="replace")

    def special_id(self, text: str) -> int:
        if text not in self.spec["special"]:
            raise KeyError(f"special token {text!r} is not in this tokenizer")
        return self.spec["special"][text]
