"""A local stand-in of the Hub's upload endpoints (create_repo, preupload, commit; regular uploads, no LFS), for the
push tests: ``fake_hub`` (in tests/conftest.py) serves it and yields its URL; ``FakeHub.files`` holds what was
pushed, by path in the repository; ``hub_cache`` lays pushed files out as a downloaded snapshot."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml


class FakeHub(BaseHTTPRequestHandler):
    """The few Hub endpoints create_repo + upload_folder call; regular (non-LFS) uploads only."""

    calls: list = []
    files: dict = {}

    def log_message(self, *args):
        pass

    def reply(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.calls.append(("GET", self.path))
        self.reply(404, {"error": "not served by the stand-in"})

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.calls.append(("POST", self.path, self.headers.get("Authorization")))
        host, oid = self.headers["Host"], "c" * 40
        if self.path == "/api/repos/create":
            request = json.loads(body)
            self.reply(200, {"url": f"http://{host}/{request['organization']}/{request['name']}"})
        elif self.path == "/api/validate-yaml":
            yaml.safe_load(json.loads(body)["content"].split("---")[1])  # the card's metadata must parse
            self.reply(200, {})
        elif "/preupload/" in self.path:
            files = json.loads(body)["files"]
            self.reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                        "oid": None} for f in files], "commitOid": "0" * 40})
        elif "/commit/" in self.path:
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "header":
                    self.calls.append(("commit", item["value"]["summary"]))
                elif item["key"] == "file":
                    self.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            self.reply(200, {"commitUrl": f"http://{host}/org/tiny/commit/{oid}", "commitOid": oid,
                             "pullRequestUrl": None})
        else:
            self.reply(404, {"error": "not served by the stand-in"})


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the client's own offline switch
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    FakeHub.calls, FakeHub.files = [], {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    server.timeout = 10
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def hub_cache(home: Path, repo_id: str, commit: str, files: dict[str, bytes]) -> None:
    """Lay ``files`` out as huggingface_hub's cache holds a download of ``repo_id`` at ``commit`` (refs/main)."""
    repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for name, data in files.items():
        path = repo / "snapshots" / commit / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
