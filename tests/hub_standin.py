"""A local stand-in of the Hugging Face hub: the few endpoints the hub client
calls to list and download a repository (repo info, the recursive tree
listing, HEAD and GET of /{repo}/resolve/{rev}/{path}), plus plain files
under /files/ (torchvision and open_clip URL downloads). Serves bytes held
in memory; records every request path, so tests can say what was fetched."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class StandInHub:
    def __init__(self, repos: dict[str, dict[str, bytes]], files: dict[str, bytes] | None = None):
        self.repos, self.files, self.requests = repos, files or {}, []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub._serve(self, body=False)

            def do_GET(self):
                hub._serve(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def fetched(self) -> list[str]:
        """Paths of files downloaded (GET of a file's bytes)."""
        return [p for m, p in self.requests if m == "GET" and ("/resolve/" in p or p.startswith("/files/"))]

    def _repo(self, parts: list[str]):
        repo = "/".join(parts[:2])
        return repo, self.repos.get(repo)

    def _serve(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        self.requests.append((h.command, path))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"]:
            repo, files = self._repo(parts[2:])
            if files is None:
                return self._send(h, 404, b'{"error": "Repository not found"}', body, {"X-Error-Code": "RepoNotFound"})
            rest = parts[4:]
            if rest[:1] == ["tree"]:
                prefix = "/".join(rest[2:])
                recursive = "recursive=true" in (urlsplit(h.path).query or "").lower()
                entries = [{"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                           for p, b in sorted(files.items())
                           if p.startswith(prefix) and (recursive or "/" not in p[len(prefix):].lstrip("/"))]
                return self._send(h, 200, json.dumps(entries).encode(), body)
            info = {"id": repo, "modelId": repo, "sha": COMMIT, "private": False,
                    "siblings": [{"rfilename": p, "size": len(b)} for p, b in sorted(files.items())]}
            return self._send(h, 200, json.dumps(info).encode(), body)
        if parts[0] == "files" and "/".join(parts[1:]) in self.files:
            return self._send(h, 200, self.files["/".join(parts[1:])], body)
        if len(parts) > 4 and parts[2] == "resolve":
            repo, files = self._repo(parts)
            name = "/".join(parts[4:])
            if files is None or name not in files:
                return self._send(h, 404, b"not found", body, {"X-Error-Code": "EntryNotFound"})
            data = files[name]
            return self._send(h, 200, data, body, {"X-Repo-Commit": COMMIT,
                                                   "ETag": f'"{hashlib.sha256(data).hexdigest()}"'})
        self._send(h, 404, b"not found", body)

    @staticmethod
    def _send(h, status: int, data: bytes, body: bool, headers: dict | None = None) -> None:
        h.send_response(status)
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        if body:
            h.wfile.write(data)
