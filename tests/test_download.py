"""`gpt2-jax download` against a local HTTP server on 127.0.0.1: resume, retry, hashes."""

from __future__ import annotations

import http.server
import threading

import pytest

from gpt2_jax import download as dl
from gpt2_jax.cli import main
from gpt2_jax.errors import UserError


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves server.files[path]; honours Range; can cut a response short once per path."""

    def do_GET(self):  # noqa: N802 - http.server's naming
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        body = srv.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        if (rng := self.headers.get("Range")) and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        payload = body[start:]
        if self.path in srv.cut_once:  # send half, then drop the connection
            srv.cut_once.discard(self.path)
            self.wfile.write(payload[:len(payload) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(gpt2_vocab_dir):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.requests, srv.cut_once = [], set()
    srv.files = {f"/124M/{name}": f"{name} payload ".encode() * 1000 for name in dl.FILES}
    for name in ("encoder.json", "vocab.bpe"):
        srv.files[f"/124M/{name}"] = (gpt2_vocab_dir / name).read_bytes()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


def test_downloads_every_release_file(server, tmp_path, capsys):
    main(["download", "124M", "--models_dir", str(tmp_path), "--base_url", server.url])
    for name in dl.FILES:
        assert (tmp_path / "124M" / name).read_bytes() == server.files[f"/124M/{name}"]
    assert not list((tmp_path / "124M").glob("*.part"))
    assert "downloaded 124M" in capsys.readouterr().out
    count = len(server.requests)
    dl.download_model("124M", tmp_path, base_url=server.url, progress=False)  # complete: nothing fetched
    assert len(server.requests) == count


def test_resumes_a_partial_file(server, tmp_path):
    name = "model.ckpt.data-00000-of-00001"
    body = server.files[f"/124M/{name}"]
    (tmp_path / "124M").mkdir()
    (tmp_path / "124M" / f"{name}.part").write_bytes(body[:5000])
    dl.download_model("124M", tmp_path, base_url=server.url, progress=False)
    assert (tmp_path / "124M" / name).read_bytes() == body
    assert (f"/124M/{name}", "bytes=5000-") in server.requests


def test_retries_a_cut_connection_and_resumes(server, tmp_path, monkeypatch):
    monkeypatch.setattr(dl.time, "sleep", lambda s: None)
    path = "/124M/model.ckpt.meta"
    server.cut_once.add(path)
    dl.download_model("124M", tmp_path, base_url=server.url, progress=False)
    assert (tmp_path / "124M" / "model.ckpt.meta").read_bytes() == server.files[path]
    ranges = [r for p, r in server.requests if p == path]
    assert ranges[0] is None and ranges[1] == f"bytes={len(server.files[path]) // 2}-"


def test_rejects_a_wrong_hash(server, tmp_path):
    server.files["/124M/vocab.bpe"] = b"#version: 0.2\nnot the real merges\n"
    with pytest.raises(UserError, match="sha256 .* does not match the expected 1ce16647"):
        dl.download_model("124M", tmp_path, base_url=server.url, progress=False)
    assert not (tmp_path / "124M" / "vocab.bpe").exists()
    assert not (tmp_path / "124M" / "vocab.bpe.part").exists()


def test_gives_up_with_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(dl.time, "sleep", lambda s: None)
    with pytest.raises(UserError, match="download failed after 3 attempts"):  # nothing listens on port 9
        dl.download_model("124M", tmp_path, base_url="http://127.0.0.1:9", retries=2, progress=False)


def test_missing_file_and_unknown_size(server, tmp_path, capsys):
    del server.files["/124M/hparams.json"]
    with pytest.raises(UserError, match="hparams.json: HTTP 404"):
        dl.download_model("124M", tmp_path, base_url=server.url, progress=False)
    with pytest.raises(SystemExit) as e:
        main(["download", "2B", "--models_dir", str(tmp_path), "--base_url", server.url])
    assert e.value.code == 2 and "unknown model size '2B'" in capsys.readouterr().err


def test_downloaded_vocabulary_loads(server, tmp_path):
    from gpt2_jax import get_encoder

    out = dl.download_model("124M", tmp_path, base_url=server.url, progress=False)
    assert get_encoder(out).encode("Hello world") == [15496, 995]
