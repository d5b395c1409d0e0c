"""A Hugging Face hub of one model on 127.0.0.1: the requests `huggingface_hub`'s
snapshot_download makes of a hub (or of a mirror named by HF_ENDPOINT), answered from a local
directory. Tests never reach the real hub; this lets the build's HF path run for real."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

# Every revision name resolves to this commit.
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@contextmanager
def fake_hub(repo: str, model_dir: Path) -> Iterator[tuple[str, list[str]]]:
    """(endpoint URL, log of `METHOD path` lines) of a hub serving `model_dir`'s files as
    `repo`: the repo's info (its commit), its file tree, and each file under /resolve/."""
    files = {
        p.relative_to(model_dir).as_posix(): p.read_bytes()
        for p in sorted(model_dir.rglob("*"))
        if p.is_file()
    }
    requests: list[str] = []

    class Hub(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # quiet: `requests` is the log
            pass

        def _answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
            self.send_response(status)
            for name, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, obj: object) -> None:
            self._answer(200, json.dumps(obj).encode(), {"Content-Type": "application/json"})

        def do_GET(self) -> None:
            path = unquote(urlsplit(self.path).path)
            requests.append(f"{self.command} {path}")
            if path.startswith(f"/api/models/{repo}/revision/"):
                siblings = [{"rfilename": name} for name in files]
                return self._json({"id": repo, "sha": COMMIT, "siblings": siblings})
            if path == f"/api/models/{repo}/tree/{COMMIT}":
                return self._json(
                    [
                        {"type": "file", "oid": _git_blob_id(data), "size": len(data), "path": name}
                        for name, data in files.items()
                    ]
                )
            prefix = f"/{repo}/resolve/{COMMIT}/"
            if path.startswith(prefix) and path[len(prefix) :] in files:
                data = files[path[len(prefix) :]]
                etag = f'"{_git_blob_id(data)}"'
                headers = {"X-Repo-Commit": COMMIT, "ETag": etag}
                return self._answer(
                    200, data, {**headers, "Content-Type": "application/octet-stream"}
                )
            self._answer(404, b'{"error": "not found"}', {"X-Error-Code": "EntryNotFound"})

        do_HEAD = do_GET

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
