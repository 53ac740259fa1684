"""A Hugging Face Hub on 127.0.0.1 for the tests: the endpoints huggingface_hub calls to list a
model repo and download from it, answered as the Hub answers them (read from huggingface_hub's
source: hf_api.model_info / list_repo_tree, file_download.get_hf_file_metadata / http_get,
utils/_http.hf_raise_for_status). Point HF_ENDPOINT at `url`. It records every request.

    GET  /api/models/{repo}[/revision/{rev}][?blobs=true]  model info; siblings with size, blobId
                                                           and, for LFS files, lfs.sha256
    GET  /api/models/{repo}/tree/{rev}[/{dir}]             the file listing snapshot_download reads
    HEAD /{repo}/resolve/{rev}/{file}                      X-Repo-Commit, ETag (LFS files:
    GET  /{repo}/resolve/{rev}/{file}                      X-Linked-Etag = sha256, X-Linked-Size)
    anything else (e.g. /api/agent-harnesses)              404

No Xet headers are sent, so the client downloads over plain HTTP, and no Link header, so each
listing is one page. Errors carry X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound),
which the client turns into its exception types."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".pth", ".onnx")  # as a .gitattributes tracks


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict] = {}  # repo id -> {"commits": {sha: files}, "refs": {name: sha}}
        self.requests: list[tuple[str, str]] = []  # (method, path with query)
        self.corrupt: set[tuple[str, str]] = set()  # (repo, file) served with one byte flipped
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                hub._answer(self, body=True)

            def do_HEAD(self):
                hub._answer(self, body=False)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_commit(self, repo: str, files: dict[str, bytes], branch: str = "main") -> str:
        """A commit of `files` on `branch`; its 40-hex id."""
        entry = self.repos.setdefault(repo, {"commits": {}, "refs": {}})
        listing = "".join(f"{name}:{hashlib.sha256(data).hexdigest()}\n" for name, data in sorted(files.items()))
        commit = hashlib.sha1(f"{repo}@{len(entry['commits'])}\n{listing}".encode()).hexdigest()
        entry["commits"][commit] = dict(files)
        entry["refs"][branch] = commit
        return commit

    def requested(self, file: str) -> bool:
        """Whether any request named `file` (a file path in a repo)."""
        return any(path.split("?")[0].endswith("/" + file) for _, path in self.requests)

    # ------------------------------------------------------------------------------ serving

    def _answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        self.requests.append((handler.command, handler.path))
        url = urlsplit(handler.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            self._api(handler, "/".join(parts[2:4]), parts[4:], parse_qs(url.query))
        elif len(parts) >= 5 and parts[2] == "resolve":
            self._resolve(handler, "/".join(parts[:2]), parts[3], "/".join(parts[4:]), body)
        else:
            self._send(handler, 404, b"not found", {"X-Error-Code": "EntryNotFound"})

    def _commit(self, handler, repo: str, revision: str) -> str | None:
        entry = self.repos.get(repo)
        if entry is None:
            self._send(handler, 404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})
            return None
        commit = revision if revision in entry["commits"] else entry["refs"].get(revision)
        if commit is None:
            self._send(handler, 404, b'{"error": "Invalid rev id"}', {"X-Error-Code": "RevisionNotFound"})
        return commit

    def _api(self, handler, repo: str, rest: list[str], query: dict) -> None:
        if rest[:1] in ([], ["revision"]):  # model info
            commit = self._commit(handler, repo, rest[1] if len(rest) > 1 else "main")
            if commit is None:
                return
            files = self.repos[repo]["commits"][commit]
            blobs = [v.lower() for v in query.get("blobs", [])] == ["true"]
            siblings = [{"rfilename": name} | (_file_metadata(data, name, info=True) if blobs else {})
                        for name, data in sorted(files.items())]
            self._json(handler, {"id": repo, "modelId": repo, "sha": commit, "private": False,
                                 "gated": False, "disabled": False, "tags": [], "siblings": siblings})
        elif rest[:1] == ["tree"] and len(rest) >= 2:
            commit = self._commit(handler, repo, rest[1])
            if commit is None:
                return
            prefix = "/".join(rest[2:])
            files = {n: d for n, d in self.repos[repo]["commits"][commit].items()
                     if not prefix or n.startswith(prefix + "/")}
            folders = sorted({n.rsplit("/", i)[0] for n in files for i in range(1, n.count("/") + 1)})
            self._json(handler, [{"type": "directory", "path": f, "oid": "0" * 40, "size": 0} for f in folders]
                       + [{"type": "file", "path": n, **_file_metadata(d, n, info=False)}
                          for n, d in sorted(files.items())])
        else:
            self._send(handler, 404, b"not found")

    def _resolve(self, handler, repo: str, revision: str, file: str, body: bool) -> None:
        commit = self._commit(handler, repo, revision)
        if commit is None:
            return
        data = self.repos[repo]["commits"][commit].get(file)
        if data is None:
            self._send(handler, 404, b"Entry not found", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit})
            return
        meta = _file_metadata(data, file, info=True)
        headers = {"X-Repo-Commit": commit, "ETag": f'"{meta["blobId"]}"'}
        if "lfs" in meta:  # the Hub gives an LFS file's sha256 as its linked ETag
            headers |= {"X-Linked-Etag": f'"{meta["lfs"]["sha256"]}"', "X-Linked-Size": str(len(data))}
        if (repo, file) in self.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        self._send(handler, 200, data, headers, body=body)

    def _json(self, handler, value) -> None:
        self._send(handler, 200, json.dumps(value).encode(), {"Content-Type": "application/json"})

    @staticmethod
    def _send(handler, status: int, data: bytes, headers: dict | None = None, body: bool = True) -> None:
        handler.send_response(status)
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if body:
            handler.wfile.write(data)


def _file_metadata(data: bytes, name: str, info: bool) -> dict:
    """A file's size, git blob id and LFS record, in model info's (info) or the tree's spelling."""
    if not name.endswith(LFS_SUFFIXES):
        return {"size": len(data), "blobId" if info else "oid": _git_blob_id(data)}
    sha = hashlib.sha256(data).hexdigest()
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n".encode()
    lfs = {"size": len(data), "sha256" if info else "oid": sha, "pointerSize": len(pointer)}
    return {"size": len(data), "blobId" if info else "oid": _git_blob_id(pointer), "lfs": lfs}


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
