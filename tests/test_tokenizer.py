import hashlib
from importlib import resources

from llmjax.tokenizer import GPT2_FILE_SHA256, get_tokenizer

SAMPLES = [
    "Hello world",
    "  leading spaces, trailing\n\n\ttabs\t",
    "Unicode: naïve café, 日本語, emoji 🤖🚀, Ελληνικά",
    "numbers 1234567890 and 3.14159, it's we'll they're I'd",
    "<|endoftext|> is just text here",
    "",
]


def test_known_ids():
    tok = get_tokenizer("gpt2")
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.eot_id == 50256
    assert tok.vocab_size == 50257


def test_identical_to_tiktoken(reference_tiktoken, shakespeare):
    tok = get_tokenizer("gpt2")
    for text in SAMPLES + [shakespeare[:20_000]]:
        assert tok.encode(text) == reference_tiktoken.encode_ordinary(text)
    assert tok.encode_batch(SAMPLES) == reference_tiktoken.encode_ordinary_batch(SAMPLES)


def test_round_trip(shakespeare):
    for name in ("gpt2", "bytes"):
        tok = get_tokenizer(name)
        for text in SAMPLES + [shakespeare[:5_000]]:
            assert tok.decode(tok.encode(text)) == text


def test_special_token_spelling_is_plain_text():
    tok = get_tokenizer("gpt2")
    assert tok.eot_id not in tok.encode("<|endoftext|>")


def test_shipped_files_match_pinned_hashes():
    files = resources.files("llmjax") / "assets" / "gpt2"
    for name, want in GPT2_FILE_SHA256.items():
        assert hashlib.sha256((files / name).read_bytes()).hexdigest() == want


def test_bytes_tokenizer():
    tok = get_tokenizer("bytes")
    assert tok.encode("hé") == [104, 195, 169]
    assert (tok.eot_id, tok.vocab_size) == (256, 257)
    assert tok.decode([104, 256, 105]) == "hi"  # EOT never decodes into text
