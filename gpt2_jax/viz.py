"""Per-token pictures: a text coloured token by token by a model's log-probability of each token (or by the
difference between two models'), as one self-contained HTML page (its script and styles inline, nothing fetched).

Every token is predicted from the tokens before it in consecutive windows of the model's context, the text's
first token from <|endoftext|> (so every token of the text is scored, once). Hovering a token shows the
model's 5 likeliest tokens there; a table lists the worst tokens. The page's text is the file's text,
character for character: a character split over several tokens is shown once, over all of them.
"""

from __future__ import annotations

import codecs
import functools
import html
import json
import math
import os
import re
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from gpt2_jax import storage
from gpt2_jax.encoder import Encoder
from gpt2_jax.errors import UserError
from gpt2_jax.evaluate import LOGITS_PER_CHUNK, windows
from gpt2_jax.model import GPT2, GPT2Config


class TokenScores(NamedTuple):
    """Per token of a text: its log-probability under the model and the model's `top` likeliest tokens there."""

    logprobs: np.ndarray  # [N] float32
    top_ids: np.ndarray  # [N, top] int32, likeliest first
    top_logprobs: np.ndarray  # [N, top] float32


@functools.partial(jax.jit, static_argnames=("config", "top"))
def _scores(params: Any, inputs: jax.Array, targets: jax.Array, *, config: GPT2Config,
            top: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The targets' log-probabilities [B, T] and the top-k [B, T, top] (log-probabilities, ids) of windows [B, T],
    the logits made a few positions (of every row) at a time."""
    hidden, _ = GPT2(config).apply(params, inputs, method=GPT2.hidden)  # [B, T, C]

    def at(args: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:  # one position: [B, C]
        h, t = args
        logprobs = jax.nn.log_softmax(GPT2(config).apply(params, h, method=GPT2.logits), axis=-1)
        best, ids = jax.lax.top_k(logprobs, top)
        return jnp.take_along_axis(logprobs, t[:, None], axis=-1)[:, 0], best, ids

    per_chunk = max(1, LOGITS_PER_CHUNK // (inputs.shape[0] * config.n_vocab))
    picked, best, ids = jax.lax.map(at, (hidden.swapaxes(0, 1), targets.T), batch_size=per_chunk)
    return picked.T, best.swapaxes(0, 1), ids.swapaxes(0, 1)


def token_scores(config: GPT2Config, params: Any, tokens: Sequence[int] | np.ndarray, eot: int, *,
                 window: int | None = None, top: int = 5, batch_size: int = 8, progress: bool = False) -> TokenScores:
    """Each token's log-probability (and the `top` likeliest tokens at its place) given the tokens before it in
    consecutive windows of `window` (default: the model's context) tokens, the first predicted from `eot`."""
    window = window or config.n_ctx
    if not 1 <= window <= config.n_ctx:
        raise UserError(f"window={window}: must be between 1 and the model's context of {config.n_ctx}")
    if batch_size < 1:
        raise UserError(f"--batch_size={batch_size}: must be at least 1")
    n = len(tokens)
    inputs, targets, _ = windows(np.concatenate([[eot], np.asarray(tokens, np.int32)]), window)
    rows = min(batch_size, len(inputs))
    pad = (-len(inputs)) % rows  # every batch one shape: compiled once
    inputs, targets = (np.concatenate([a, np.zeros((pad, window), np.int32)]) for a in (inputs, targets))
    outs = [_scores(params, inputs[s:s + rows], targets[s:s + rows], config=config, top=top)
            for s in tqdm(range(0, len(inputs), rows), desc="scoring", unit="batch", disable=not progress)]
    picked, best, ids = (np.concatenate([np.asarray(o[k]) for o in outs]) for k in range(3))
    return TokenScores(picked.reshape(-1)[:n], ids.reshape(-1, top)[:n].astype(np.int32), best.reshape(-1, top)[:n])


def token_texts(encoder: Encoder, tokens: Sequence[int]) -> list[str]:
    """The text each token adds: a character whose UTF-8 bytes span several tokens belongs to the last of them
    (the others add ""), so the texts joined are the tokens' text; bytes of an unfinished last character add
    nothing."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return [decoder.decode(encoder.decode_bytes([t])) for t in tokens]


def _label(encoder: Encoder, token: int) -> str:
    """A token as the page names it: its text, with bytes that are not whole characters and line breaks escaped."""
    text = encoder.decode_bytes([token]).decode("utf-8", errors="backslashreplace")
    return text.replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")


def _escape(text: str) -> str:
    """HTML text that parses back to exactly `text`: markup escaped, and carriage returns and other control
    characters written as references (a parser turns a literal CR or CRLF into LF)."""
    return re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", lambda m: f"&#{ord(m.group())};", html.escape(text, quote=False))


def _colour(value: float, compare: bool) -> str:
    """A span's background: log-probability 0 (white-green) to -10 or below (red); a difference A - B from
    -5 (red) through 0 (white) to +5 (blue)."""
    if compare:
        t = max(-1.0, min(1.0, value / 5.0))
        return f"hsl({210 if t > 0 else 0},75%,{100 - 38 * abs(t):.0f}%)"
    t = max(0.0, min(1.0, -value / 10.0))
    return f"hsl({120 * (1 - t):.0f},70%,{88 - 18 * t:.0f}%)"


def _alternatives(encoder: Encoder, scores: TokenScores, i: int) -> list[list]:
    return [[_label(encoder, int(t)), float(f"{math.exp(float(lp)):.4g}")]
            for t, lp in zip(scores.top_ids[i], scores.top_logprobs[i])]


def render_page(encoder: Encoder, tokens: Sequence[int], scores: TokenScores, *, compare: TokenScores | None = None,
                names: tuple[str, str | None] = ("A", None), source: str = "", total_tokens: int | None = None,
                worst: int = 20) -> str:
    """The page: the tokens' text coloured by `scores` (by scores - compare with `compare`), the top
    alternatives on hover, and the `worst` tokens (lowest log-probabilities, or most negative differences)."""
    values = scores.logprobs if compare is None else scores.logprobs - compare.logprobs
    texts = token_texts(encoder, tokens)
    spans: list[tuple[int, int, str]] = []  # (first token, last token, text): tokens adding "" join the next
    first = 0
    for i, text in enumerate(texts):
        if text:
            spans.append((first, i, "".join(texts[first:i + 1])))
            first = i + 1
    span_of = np.zeros(len(tokens), np.int64)
    for s, (a, b, _) in enumerate(spans):
        span_of[a:b + 1] = s
    shown = spans[-1][1] + 1 if spans else 0  # tokens of an unfinished last character are not shown
    order = [int(i) for i in np.argsort(values[:shown], kind="stable")[:worst]]

    data = {"compare": compare is not None, "worst": [int(span_of[i]) for i in order],
            "tokens": [[_label(encoder, int(t)), round(float(scores.logprobs[i]), 4), _alternatives(encoder, scores, i),
                        *([round(float(compare.logprobs[i]), 4), _alternatives(encoder, compare, i)]
                          if compare is not None else [])] for i, t in enumerate(tokens[:shown])]}
    body = "".join(f'<span class="t" id="s{s}" data-t="{a} {b}" style="background:'
                   f'{_colour(float(values[a:b + 1].sum()), compare is not None)}">{_escape(text)}</span>'
                   for s, (a, b, text) in enumerate(spans))
    joined, offsets = "".join(texts), np.cumsum([0, *map(len, texts)])
    # the worst table: each token with the text before it, line breaks and tabs shown as arrows
    before = [re.sub(r"\r\n?|\n", "↵", joined[max(0, offsets[i] - 24):offsets[i]]).replace("\t", "→")
              for i in order]
    rows = "".join(
        f'<tr><td>{i}</td><td class="ctx">{_escape(context)}</td><td><a href="#s{span_of[i]}" data-s="{span_of[i]}">'
        f'<code>“{_escape(_label(encoder, tokens[i]))}”</code></a></td><td>{values[i]:+.3f}</td></tr>'
        for i, context in zip(order, before))
    mean = float(np.mean(scores.logprobs[:shown])) if shown else 0.0
    if compare is None:
        summary = (f"coloured by log p(token) under <b>{html.escape(names[0])}</b>; mean {mean:.4f} "
                   f"(loss {-mean:.4f}, perplexity {math.exp(-mean):.2f})")
        legend = ("log p: 0", "-5", "≤ -10", [_colour(-10.0 * k / 8, False) for k in range(9)])
        heading, column = "Lowest log-probabilities", "log p"
    else:
        diff = float(np.mean(values[:shown])) if shown else 0.0
        summary = (f"coloured by log p<sub>A</sub> − log p<sub>B</sub>: A = <b>{html.escape(names[0])}</b>, "
                   f"B = <b>{html.escape(str(names[1]))}</b>; mean log p: A {mean:.4f}, "
                   f"B {float(np.mean(compare.logprobs[:shown])) if shown else 0.0:.4f}, A − B {diff:+.4f}")
        legend = ("A − B: ≤ -5 (B likelier)", "0", "≥ +5 (A likelier)", [_colour(5.0 * k / 4, True)
                                                                         for k in range(-4, 5)])
        heading, column = "Most negative differences (A − B)", "A − B"
    counted = f"{shown} tokens" + (f" (the first {shown} of {total_tokens})" if total_tokens and
                                   total_tokens > shown else "")
    return PAGE.format(
        title=html.escape(f"gpt2-jax viz: {source or 'text'}"), source=html.escape(source), counted=counted,
        summary=summary, low=legend[0], mid=legend[1], high=legend[2], gradient=",".join(legend[3]),
        body=body, heading=heading, column=column, rows=rows,
        data=json.dumps(data, ensure_ascii=False).replace("<", "\\u003c").replace(">", "\\u003e")
        .replace("&", "\\u0026"), script=SCRIPT)


def read_text(path: str | os.PathLike, encoding: str = "utf-8") -> str:
    """A text file's text exactly (line endings kept), or one line naming it."""
    file = storage.path(path)
    if not file.is_file():
        raise UserError(f"--dataset {path}: not a file (give a text file)")
    try:
        text = file.read_bytes().decode(encoding)
    except UnicodeDecodeError as e:
        raise UserError(f"--dataset {path}: not {encoding} text ({e.reason} at byte {e.start}); set --encoding") \
            from None
    except LookupError:
        raise UserError(f"--encoding {encoding}: not a known text encoding") from None
    if not text:
        raise UserError(f"--dataset {path}: the file is empty")
    return text


def write_page(model_dir: str, dataset: str, out: str, *, compare: str | None = None, max_tokens: int = 2048,
               worst: int = 20, batch_size: int = 8, dtype: str = "float32", encoding: str = "utf-8",
               progress: bool = False) -> dict[str, Any]:
    """`gpt2-jax viz`: the page of `dataset`'s first `max_tokens` tokens under `model_dir` (minus `compare`'s),
    written to `out`; returns what it shows (tokens, mean log-probabilities)."""
    from gpt2_jax.api import load

    if max_tokens < 1:
        raise UserError(f"--max_tokens={max_tokens}: must be at least 1")
    if worst < 0:
        raise UserError(f"--worst={worst}: must be at least 0")
    target = storage.path(out)
    storage.check_writable(target.parent, "--out")
    if not storage.is_url(target) and not target.parent.is_dir():
        raise UserError(f"--out {out}: the directory {target.parent} does not exist")
    text = read_text(dataset, encoding)
    a = load(model_dir, dtype=dtype)
    every = a.encoder.encode(text)
    tokens = every[:max_tokens]
    b = load(compare, dtype=dtype) if compare else None
    if b is not None and b.encoder.encode(text)[:max_tokens] != tokens:
        raise UserError(f"--compare {compare}: its vocabulary tokenises the text differently from {model_dir}'s; "
                        "compare models that share one")
    window = min(a.config.n_ctx, b.config.n_ctx) if b is not None else a.config.n_ctx  # the same contexts for both
    score = functools.partial(token_scores, tokens=tokens, eot=a.encoder.eot_token, window=window,
                              batch_size=batch_size, progress=progress)
    scores = score(a.config, a.params)
    other = score(b.config, b.params) if b is not None else None
    page = render_page(a.encoder, tokens, scores, compare=other, names=(model_dir, compare),
                       source=os.path.basename(str(dataset)), total_tokens=len(every), worst=worst)
    target.write_text(page, encoding="utf-8")
    result = {"tokens": len(tokens), "mean_logprob": float(np.mean(scores.logprobs))}
    if other is not None:
        result["mean_logprob_compare"] = float(np.mean(other.logprobs))
    return result


SCRIPT = r"""
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("viz-data").textContent);
  const tip = document.getElementById("tip");
  const text = document.getElementById("text");
  const el = (tag, content, cls) => {
    const e = document.createElement(tag);
    if (content !== undefined) e.textContent = content;
    if (cls) e.className = cls;
    return e;
  };
  const signed = (x) => (x > 0 ? "+" : "") + x.toFixed(3);
  const percent = (p) => (p >= 0.001 ? (100 * p).toFixed(1) : (100 * p).toExponential(1)) + "%";
  function alternatives(title, alts, actual) {
    const table = el("table");
    const head = table.insertRow();
    head.appendChild(el("th", title)).colSpan = 2;
    for (const [label, p] of alts) {
      const row = table.insertRow();
      row.appendChild(el("td", "\u201c" + label + "\u201d", label === actual ? "actual" : undefined));
      row.appendChild(el("td", percent(p), "p"));
    }
    return table;
  }
  function show(span) {
    const [first, last] = span.dataset.t.split(" ").map(Number);
    tip.replaceChildren();
    for (let i = first; i <= last; i++) {
      const [label, a, altsA, b, altsB] = data.tokens[i];
      tip.appendChild(el("div", "token " + i + ": \u201c" + label + "\u201d", "head"));
      tip.appendChild(el("div", data.compare
        ? "log p: A " + a.toFixed(3) + ", B " + b.toFixed(3) + ", A \u2212 B " + signed(a - b)
        : "log p " + a.toFixed(3) + " (p = " + percent(Math.exp(a)) + ")", "value"));
      const tables = el("div", undefined, "alts");
      tables.appendChild(alternatives(data.compare ? "top 5 under A" : "top 5", altsA, label));
      if (data.compare) tables.appendChild(alternatives("top 5 under B", altsB, label));
      tip.appendChild(tables);
    }
    const box = span.getBoundingClientRect();
    tip.hidden = false;
    const left = Math.min(box.left + window.scrollX, window.scrollX + document.documentElement.clientWidth
                          - tip.offsetWidth - 8);
    tip.style.left = Math.max(4, left) + "px";
    const below = box.bottom + 6 + tip.offsetHeight <= document.documentElement.clientHeight;
    tip.style.top = (window.scrollY + (below ? box.bottom + 6 : Math.max(4, box.top - tip.offsetHeight - 6))) + "px";
    document.querySelectorAll("span.t.on").forEach((s) => s.classList.remove("on"));
    span.classList.add("on");
  }
  text.addEventListener("mouseover", (e) => {
    const span = e.target.closest("span.t");
    if (span) show(span);
  });
  text.addEventListener("mouseleave", () => { tip.hidden = true; });
  document.getElementById("worst").addEventListener("click", (e) => {
    const link = e.target.closest("a[data-s]");
    if (!link) return;
    e.preventDefault();
    const span = document.getElementById("s" + link.dataset.s);
    span.scrollIntoView({block: "center"});
    show(span);
  });
  if (location.hash === "#hover-worst" && data.worst.length) show(document.getElementById("s" + data.worst[0]));
  document.body.dataset.viz = "ready";
})();
"""

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 0; color: #222; background: #fafafa; }}
header {{ padding: 12px 20px; background: #fff; border-bottom: 1px solid #ddd; }}
h1 {{ font-size: 18px; margin: 0 0 4px; }} h2 {{ font-size: 15px; margin: 0 0 8px; }}
.meta {{ margin: 2px 0; color: #444; }}
.legend {{ display: flex; align-items: center; gap: 8px; margin-top: 6px; font-size: 12px; }}
.bar {{ width: 260px; height: 12px; border: 1px solid #ccc; background: linear-gradient(to right, {gradient}); }}
main {{ display: flex; gap: 20px; padding: 16px 20px; align-items: flex-start; }}
#text-section {{ flex: 3; min-width: 0; }}
#text {{ font: 13px/1.7 ui-monospace, "DejaVu Sans Mono", monospace; white-space: pre-wrap; overflow-wrap: anywhere;
         background: #fff; border: 1px solid #ddd; padding: 12px; }}
span.t {{ border-radius: 2px; cursor: default; }}
span.t:hover, span.t.on {{ outline: 2px solid #333; }}
aside {{ flex: 2; min-width: 280px; max-width: 460px; }}
#worst {{ border-collapse: collapse; width: 100%; font-size: 12px; background: #fff; }}
#worst th, #worst td {{ border-bottom: 1px solid #eee; padding: 3px 6px; text-align: left; }}
#worst td.ctx {{ color: #888; font-family: ui-monospace, "DejaVu Sans Mono", monospace; white-space: pre;
                 text-align: right; }}
#tip {{ position: absolute; z-index: 10; background: #fff; border: 1px solid #999; border-radius: 4px;
        box-shadow: 0 2px 8px rgba(0,0,0,.25); padding: 8px 10px; font-size: 12px; max-width: 520px; }}
#tip .head {{ font-weight: 600; font-family: ui-monospace, "DejaVu Sans Mono", monospace; margin-top: 4px; }}
#tip .alts {{ display: flex; gap: 14px; margin-top: 4px; }}
#tip table {{ border-collapse: collapse; }} #tip th {{ text-align: left; font-weight: 500; color: #555; }}
#tip td {{ padding: 1px 6px 1px 0; font-family: ui-monospace, "DejaVu Sans Mono", monospace; white-space: pre; }}
#tip td.p {{ text-align: right; }} #tip td.actual {{ font-weight: 700; }}
</style>
</head>
<body>
<header>
<h1>gpt2-jax viz: {source}</h1>
<p class="meta">{counted}, {summary}</p>
<div class="legend"><span>{low}</span><span class="bar"></span><span>{high}</span><span>(middle: {mid}; hover a token
for the 5 likeliest tokens there)</span></div>
</header>
<main>
<section id="text-section"><h2>Text</h2><div id="text">{body}</div></section>
<aside><h2>{heading}</h2>
<table id="worst"><tr><th>token #</th><th>before it</th><th>token</th><th>{column}</th></tr>{rows}</table></aside>
</main>
<div id="tip" hidden></div>
<script type="application/json" id="viz-data">{data}</script>
<script>{script}</script>
</body>
</html>
"""
