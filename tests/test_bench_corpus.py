"""scao_fx.bench.corpus: deterministic, offline corpus and seeded batches."""

from __future__ import annotations

import socket

import pytest
import torch

from scao_fx.bench.corpus import BatchStream, build_corpus, sample_batch, stdlib_files, stdlib_text


@pytest.fixture
def fake_stdlib(tmp_path):
    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    (root / "site-packages" / "thirdparty").mkdir(parents=True)
    (root / "b.py").write_text("def b():\n    return 2\n")
    (root / "a.py").write_text("def a():\n    return 1\n")
    (root / "pkg" / "__init__.py").write_text("X = 'é'\n")
    (root / "notes.txt").write_text("not python")
    (root / "site-packages" / "thirdparty" / "mod.py").write_text("IGNORED = True\n")
    return root


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the corpus builder must not open network connections")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_stdlib_files_sorted_and_filtered(fake_stdlib):
    files = stdlib_files(fake_stdlib)
    rel = [p.relative_to(fake_stdlib).as_posix() for p in files]
    assert rel == ["a.py", "b.py", "pkg/__init__.py"]


def test_stdlib_text_order_and_cap(fake_stdlib):
    text, n = stdlib_text(10_000, fake_stdlib)
    assert n == 3
    assert text.index("def a") < text.index("def b") < text.index("X = 'é'")
    assert "IGNORED" not in text
    first = len("# file: a.py\ndef a():\n    return 1\n\n")
    short, n_short = stdlib_text(first + 4, fake_stdlib)  # the second file is cut
    assert len(short) == first + 4 and n_short == 2 and short == text[: first + 4]
    only, n_only = stdlib_text(first, fake_stdlib)
    assert n_only == 1 and only == text[:first]


def test_real_stdlib_corpus_is_deterministic_and_offline(no_network):
    a = build_corpus(max_chars=100_000)
    b = build_corpus(max_chars=100_000)
    assert a.sha256 == b.sha256
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert a.n_chars == 100_000
    assert a.train.numel() + a.val.numel() == 100_000
    assert a.val.numel() == 10_000
    assert a.train.dtype == torch.int64
    assert int(a.train.max()) < a.vocab_size and int(a.train.min()) >= 0
    assert "Python standard library" in a.source
    # it is Python source: the decoded text contains keywords
    assert "def " in a.decode(a.train[:20_000])


def test_char_roundtrip_and_byte_tokenizer(fake_stdlib):
    c = build_corpus(max_chars=10_000, stdlib_root=fake_stdlib, val_fraction=0.25)
    text, _ = stdlib_text(10_000, fake_stdlib)
    assert c.decode(torch.cat([c.train, c.val])) == text
    assert c.vocab_size == len(set(text))
    b = build_corpus(max_chars=10_000, stdlib_root=fake_stdlib, tokenizer="byte", val_fraction=0.25)
    assert b.vocab_size == 256
    assert bytes(torch.cat([b.train, b.val]).tolist()) == text.encode("utf-8")


def test_data_file(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("hello world " * 100)
    c = build_corpus(path, val_fraction=0.1)
    assert c.n_chars == 1200 and c.vocab_size == len(set("hello world "))
    assert c.source == f"file {path}"


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError):
        build_corpus(tokenizer="word")
    with pytest.raises(ValueError):
        build_corpus(val_fraction=0.0)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("ab")
    with pytest.raises(ValueError):
        build_corpus(tiny)


def test_batches_seeded_and_shifted():
    data = torch.arange(1000)
    x1, y1 = sample_batch(data, 4, 16, torch.Generator().manual_seed(3))
    x2, y2 = sample_batch(data, 4, 16, torch.Generator().manual_seed(3))
    x3, _ = sample_batch(data, 4, 16, torch.Generator().manual_seed(4))
    assert x1.shape == y1.shape == (4, 16)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)
    assert torch.equal(y1[:, :-1], x1[:, 1:])  # next-token targets
    assert torch.equal(x1[:, 1:] - x1[:, :-1], torch.ones(4, 15, dtype=torch.int64))  # contiguous windows
    with pytest.raises(ValueError):
        sample_batch(torch.arange(10), 2, 16, torch.Generator())


def test_batch_stream_pairs_by_seed():
    data = torch.arange(5000)
    s1, s2, s3 = BatchStream(data, 2, 8, seed=7), BatchStream(data, 2, 8, seed=7), BatchStream(data, 2, 8, seed=8)
    for _ in range(5):
        (a, _), (b, _), (c, _) = next(s1), next(s2), next(s3)
        assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # the global RNG does not influence the stream
    torch.manual_seed(123)
    fresh = BatchStream(data, 2, 8, seed=7)
    torch.manual_seed(999)
    again = BatchStream(data, 2, 8, seed=7)
    assert torch.equal(next(fresh)[0], next(again)[0])
