"""gpt2-jax viz: every token's log-probability and top-5 equal transformers' on a tiny random GPT-2, and the page,
opened in a real headless Chromium (Debian's `chromium`), runs its script without a console message, shows
exactly the file's text, its hover box and worst tokens, and is drawn to a screenshot."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser

import numpy as np
import pytest

from conftest import random_hf_model, save_hf_model, tiny_hf_dir
from gpt2_jax.cli import main as cli_main

# Markup, quotes, CRLF and a lone CR, tabs, runs of spaces, a leading newline, characters of 2 to 4 UTF-8 bytes
# (split over several byte-level tokens), a no-break space and a literal end-of-text marker: all shown as they are.
TEXT = ('\nHello <world> & "friends" \'a\'\r\nline two\twith  spaces\rcafé — naïve 🙂 x\u00a0y <|endoftext|> '
        "the cat sat on the mat and the dog ran to the park where birds sang all day long.\n")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--enable-logging=stderr", "--v=0"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two tiny random GPT-2s (64-token context, byte-level vocabulary): A and B."""
    return tiny_hf_dir(tmp_path_factory.mktemp("a"), seed=7), tiny_hf_dir(tmp_path_factory.mktemp("b"), seed=8)


def _chromium() -> str:
    """Debian's chromium; the test skips without it (fails under CI, whose .ci/run installs it)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        message = "chromium is not installed (apt-get install -y chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def _open(page, *args: str) -> tuple[str, list[str]]:
    """Chromium's output (the DOM with --dump-dom), decoded as bytes so that no CR is translated, and the console
    messages it logged, with a fresh profile."""
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run([_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, page.as_uri()
                               + "#hover-worst"], capture_output=True, timeout=120)
    errors = done.stderr.decode(errors="replace")
    assert done.returncode == 0, errors[-3000:]
    return done.stdout.decode("utf-8"), [line for line in errors.splitlines() if ":CONSOLE" in line]


class _Page(HTMLParser):
    """What a page shows: the text of div#text (its spans' text joined) and of the hover box div#tip, the rows of
    cells of the hover box's tables and of the worst tokens' table, and whether the script marked the body ready."""

    VOID = frozenset({"meta", "link", "br", "hr", "img", "input", "wbr"})

    def __init__(self, dom: str):
        super().__init__(convert_charrefs=True)
        self.ready, self.texts, self.cells = False, {"text": "", "tip": ""}, {"tip": [], "worst": []}
        self._open: list[tuple[str, str | None]] = []  # the open elements: (tag, the section it is in)
        self.feed(dom)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "body":
            self.ready = attrs.get("data-viz") == "ready"
        section = attrs.get("id") if attrs.get("id") in ("text", "tip", "worst") else \
            (self._open[-1][1] if self._open else None)
        if tag not in self.VOID:
            self._open.append((tag, section))
        if section in self.cells and tag == "tr":
            self.cells[section].append([])
        elif section in self.cells and tag in ("td", "th"):
            self.cells[section][-1].append("")

    def handle_endtag(self, tag):
        while self._open and self._open.pop()[0] != tag:
            pass

    def handle_data(self, data):
        section = self._open[-1][1] if self._open else None
        if section in self.texts:
            self.texts[section] += data
        if section in self.cells and any(t in ("td", "th") for t, _ in self._open):
            self.cells[section][-1][-1] += data


def test_log_probs_and_top_5_equal_transformers(models):
    import torch
    from transformers import GPT2LMHeadModel

    from gpt2_jax.api import load
    from gpt2_jax.viz import token_scores

    model = load(models[0])
    tokens = model.encoder.encode(TEXT)
    eot, n_ctx = model.encoder.eot_token, model.config.n_ctx
    assert len(tokens) > 2 * n_ctx  # three windows: with batch_size=2, the last batch is padded
    scores = token_scores(model.config, model.params, tokens, eot, batch_size=2)
    hf = GPT2LMHeadModel.from_pretrained(models[0]).eval()
    whole = [eot, *tokens]
    picked, best, ids = [], [], []
    for start in range(0, len(tokens), n_ctx):  # consecutive windows, each token predicted once
        inputs = whole[start:start + n_ctx][:len(tokens) - start]
        with torch.no_grad():
            logprobs = torch.log_softmax(hf(torch.tensor([inputs])).logits[0].double(), -1)
        targets = torch.tensor(whole[start + 1:start + 1 + len(inputs)])
        picked.append(logprobs[torch.arange(len(inputs)), targets].numpy())
        top = torch.topk(logprobs, 5, dim=-1)
        best.append(top.values.numpy()), ids.append(top.indices.numpy())
    np.testing.assert_allclose(scores.logprobs, np.concatenate(picked), rtol=0, atol=1e-5)
    np.testing.assert_allclose(scores.top_logprobs, np.concatenate(best), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(scores.top_ids, np.concatenate(ids))


def test_token_texts_join_to_the_text_a_split_character_on_its_last_token(models):
    from gpt2_jax.encoder import get_encoder
    from gpt2_jax.viz import token_texts

    encoder = get_encoder(models[0])
    texts = token_texts(encoder, encoder.encode(TEXT))
    assert "".join(texts) == TEXT
    smile = texts.index("🙂")
    assert texts[smile - 3:smile] == ["", "", ""]  # its first three bytes add no character
    assert "".join(token_texts(encoder, encoder.encode("a🙂")[:3])) == "a"  # an unfinished character: nothing


def _data(html: str) -> dict:
    return json.loads(re.search(r'<script type="application/json" id="viz-data">(.*?)</script>', html, re.S).group(1))


@pytest.mark.parametrize("compare", [False, True], ids=["log-probs", "compare"])
def test_the_page_in_chromium(compare, models, tmp_path):
    from gpt2_jax.api import load
    from gpt2_jax.viz import token_scores

    (tmp_path / "text.txt").write_bytes(TEXT.encode("utf-8"))
    page = tmp_path / "page.html"
    cli_main(["viz", "--model_dir", str(models[0]), *(["--compare", str(models[1])] if compare else []),
              "--dataset", str(tmp_path / "text.txt"), "--out", str(page), "--worst", "12", "--batch_size", "2"])
    html = page.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*(?!["']?#)|url\(|@import|https?://""", html)  # nothing fetched

    dom, console = _open(page, "--dump-dom")
    assert console == []  # no error, no message
    shown = _Page(dom)
    assert shown.ready  # the script ran to its end
    assert shown.texts["text"] == TEXT  # character for character: CR, CRLF, markup, tabs, split characters

    a = load(models[0])
    tokens = a.encoder.encode(TEXT)
    scores = token_scores(a.config, a.params, tokens, a.encoder.eot_token)
    values = scores.logprobs
    data = _data(html)
    np.testing.assert_allclose([t[1] for t in data["tokens"]], scores.logprobs, atol=1e-4)
    if compare:
        b = load(models[1])
        other = token_scores(b.config, b.params, tokens, b.encoder.eot_token).logprobs
        np.testing.assert_allclose([t[3] for t in data["tokens"]], other, atol=1e-4)
        values = values - other
    worst = [row for row in shown.cells["worst"] if row[0].isdigit()]
    assert [int(row[0]) for row in worst] == list(np.argsort(values, kind="stable")[:12])
    assert [float(row[-1]) for row in worst] == pytest.approx(sorted(values)[:12], abs=1e-3)
    # the hover box of the worst token: its 5 likeliest tokens under A (and under B), with their probabilities
    tip = shown.texts["tip"]
    heads = re.findall(r"token (\d+): ", tip)  # one per token of the worst token's span (a character's bytes)
    assert int(np.argsort(values, kind="stable")[0]) in map(int, heads)
    assert tip.count("top 5") == (2 if compare else 1) * len(heads)
    assert sum(cell.endswith("%") for row in shown.cells["tip"] for cell in row) == 5 * tip.count("top 5")

    if compare:
        from PIL import Image

        _, console = _open(page, "--screenshot=" + str(tmp_path / "shot.png"), "--window-size=1000,700",
                           "--hide-scrollbars")
        assert console == []
        picture = np.asarray(Image.open(tmp_path / "shot.png").convert("RGB")).astype(int)
        assert picture.shape == (700, 1000, 3)
        r, b = picture[..., 0], picture[..., 2]
        assert ((b - r) > 40).sum() > 200 and ((r - b) > 40).sum() > 200  # A likelier (blue) and B likelier (red)


def test_a_script_error_is_seen(tmp_path):
    # the check above can fail: a page whose script throws logs it, and never marks itself ready
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><div id='text'>x</div><script>missing();"
                    "document.body.dataset.viz = 'ready';</script></body></html>")
    dom, console = _open(page, "--dump-dom")
    assert any("Uncaught ReferenceError" in line for line in console) and not _Page(dom).ready


def test_max_tokens_shows_the_texts_start(models, tmp_path, capsys):
    (tmp_path / "text.txt").write_bytes(TEXT.encode("utf-8"))
    page = tmp_path / "page.html"
    cli_main(["viz", "--model_dir", str(models[0]), "--dataset", str(tmp_path / "text.txt"), "--out", str(page),
              "--max_tokens", "40"])
    assert "wrote" in capsys.readouterr().out
    html = page.read_text(encoding="utf-8")
    text = _Page(html).texts["text"]  # Python's parser, not a browser: a CR written as &#13; reads back as CR here too
    assert TEXT.startswith(text) and len(text.encode()) == 40 and "the first 40 of" in html


@pytest.mark.parametrize("make, args, message", [
    (None, ["--dataset", "/nonexistent.txt"], "--dataset /nonexistent.txt: not a file"),
    ("", [], "the file is empty"),
    (b"caf\xe9 au lait", [], "not utf-8 text (invalid continuation byte at byte 3); set --encoding"),
    ("x", ["--max_tokens", "0"], "--max_tokens=0: must be at least 1"),
    ("x", ["--out", "/nonexistent/page.html"], "--out /nonexistent/page.html: the directory /nonexistent does not"),
    ("x", ["--encoding", "klingon"], "--encoding klingon: not a known text encoding"),
])
def test_bad_input_is_one_line(make, args, message, models, tmp_path, capsys):
    file = tmp_path / "text.txt"
    if make is not None:
        file.write_bytes(make if isinstance(make, bytes) else make.encode())
    with pytest.raises(SystemExit) as e:
        cli_main(["viz", "--model_dir", str(models[0]), "--dataset", str(file), "--out", str(tmp_path / "p.html"),
                  *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and message in err[0], err


def test_compare_needs_the_same_vocabulary(models, gpt2_vocab_dir, tmp_path, capsys):
    other = save_hf_model(random_hf_model(n_vocab=50257, n_ctx=64), tmp_path / "gpt2_vocab")
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copyfile(gpt2_vocab_dir / name, other / name)
    (tmp_path / "text.txt").write_text("Hello world", encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        cli_main(["viz", "--model_dir", str(models[0]), "--compare", str(other), "--dataset",
                  str(tmp_path / "text.txt"), "--out", str(tmp_path / "p.html")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "tokenises the text differently" in err
