"""A local Hugging Face Hub-compatible HTTP endpoint, for tests and offline demos.

`LocalHub` serves, on 127.0.0.1, the part of the Hub's HTTP API that huggingface_hub's real client
(`HfApi`, `hf_hub_download`, `snapshot_download`) and transformers' `from_pretrained` use:

- accounts: `GET /api/whoami-v2` (bearer tokens given to the constructor);
- repositories: `POST /api/repos/create`, `DELETE /api/repos/delete`, `GET /api/{type}s/{id}[/revision/{rev}]`,
  `GET .../tree/{rev}[/{path}]`, `POST .../paths-info/{rev}`, `GET .../refs`, `GET .../commits/{rev}`,
  `POST .../branch/{name}`;
- uploads: `POST .../preupload/{rev}` (regular or LFS upload mode), the git-LFS batch API
  (`POST /{id}.git/info/lfs/objects/batch`) with single-PUT transfers to `/lfs-upload/{sha256}`,
  `POST .../commit/{rev}` (ndjson; every operation of a commit lands together or not at all),
  `POST /api/validate-yaml` (the README front matter check done before any upload);
- downloads: `HEAD`/`GET /{id}/resolve/{rev}/{path}` with the headers the client relies on
  (`X-Repo-Commit`, `ETag`; for LFS files a redirect with `X-Linked-Etag`, `X-Linked-Size`, `Location`).

The storage is in memory: each repository holds commits (a full file map per commit) and branches;
LFS objects live in one content-addressed store, as on the Hub.

Xet: huggingface_hub >= 1.0 uploads LFS content through Xet storage whenever `hf_xet` is installed and
`HF_HUB_DISABLE_XET` is not set; it does not fall back to classic LFS on its own. This server speaks
classic LFS only, so clients pointed at it run with `HF_HUB_DISABLE_XET=1` (see `LocalHub.client_env`).
It never sends Xet headers, so downloads take the plain HTTP path.

In tests: `with LocalHub(tokens={token: user}, orgs={user: [org]}) as hub: hub.point_client_here(monkeypatch,
tmp_path, token)`; subprocesses get `hub.client_env(token)` in their environment.

Fault injection for tests: `fail_next_lfs_uploads(n, keep_bytes)` makes the next n LFS PUTs arrive
truncated (the server answers 400 IncompleteBody, as S3 does, and stores nothing).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
# Files the Hub stores in LFS whatever their size (its default .gitattributes), plus anything binary or large.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".model", ".npz",
                ".npy", ".pkl", ".gz", ".tar", ".zip", ".parquet", ".arrow", ".png", ".jpg", ".jpeg")
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES)


def git_blob_id(content: bytes) -> str:
    """The git object id of a blob: what the Hub calls `oid`/`blobId` and sends as ETag for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class Blob:
    size: int
    content: bytes | None = None  # regular files
    sha256: str | None = None  # LFS files: the content lives in the LFS store

    @property
    def is_lfs(self) -> bool:
        return self.sha256 is not None

    @property
    def blob_id(self) -> str:  # for LFS files git stores the pointer file
        return git_blob_id(lfs_pointer(self.sha256, self.size) if self.is_lfs else self.content)


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    author: str
    date: str
    files: dict[str, Blob]


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def history(self, revision: str) -> list[Commit]:
        """Commits reachable from `revision`, newest first."""
        oid, out = self.resolve(revision), []
        while oid is not None:
            out.append(self.commits[oid])
            oid = self.commits[oid].parent
        return out

    def resolve(self, revision: str) -> str | None:
        """Branch name or (full) commit id -> commit id, None when unknown."""
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None


class HubError(Exception):
    """An error answered the way the Hub does: status, X-Error-Code and a JSON {"error": message}."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class LocalHub:
    """An in-memory Hub on 127.0.0.1. Use as a context manager or call start()/stop().

    tokens: bearer token -> user name; orgs: user name -> organizations the user may write to.
    """

    def __init__(self, tokens: dict[str, str] | None = None, orgs: dict[str, list[str]] | None = None):
        self.tokens = dict(tokens or {})
        self.orgs = {user: list(names) for user, names in (orgs or {}).items()}
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs_store: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request served, for tests
        self._lock = threading.RLock()
        self._truncate_uploads: list[int] = []
        self._servers: list[ThreadingHTTPServer] = []
        self._threads: list[threading.Thread] = []

    # ---- lifecycle -------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The Hub endpoint (what HF_ENDPOINT points to)."""
        return self._address(0)

    @property
    def storage_url(self) -> str:
        """The LFS storage / CDN origin. A different origin than the Hub, as on huggingface.co: the client
        reads file metadata from the Hub's redirect answer and does not send its token to storage."""
        return self._address(1)

    def _address(self, index: int) -> str:
        if not self._servers:
            raise RuntimeError("LocalHub is not running; call start() first")
        host, port = self._servers[index].server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> LocalHub:
        hub = self

        class Handler(_HubRequestHandler):
            pass

        Handler.hub = hub
        for name in ("LocalHub", "LocalHub-storage"):
            server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # port 0: a free port
            server.daemon_threads = True
            thread = threading.Thread(target=server.serve_forever, args=(0.05,), name=name, daemon=True)
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=10)
        self._servers, self._threads = [], []

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def client_env(self, token: str | None = None) -> dict[str, str]:
        """Environment for a huggingface_hub client process talking to this server."""
        env = {"HF_ENDPOINT": self.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1"}
        if token is not None:
            env["HF_TOKEN"] = token
        return env

    def point_client_here(self, monkeypatch, hf_home, token: str | None = None) -> None:
        """Make huggingface_hub in THIS process (and subprocesses, through the environment) use this server:
        online mode, classic LFS, a private HF home. huggingface_hub reads its environment at import time, so
        its `constants` are patched too. `monkeypatch` is pytest's (undone at the end of the test)."""
        import huggingface_hub.constants as constants

        for key, value in {**self.client_env(token), "HF_HOME": str(hf_home)}.items():
            monkeypatch.setenv(key, value)
        if token is None:
            monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
        monkeypatch.setattr(constants, "ENDPOINT", self.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", self.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(Path(hf_home) / "hub"))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(Path(hf_home) / "token"))
        monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(Path(hf_home) / "stored_tokens"))
        # transformers keeps one HfApi per process, its endpoint fixed when first made: left over from an earlier
        # (stopped) LocalHub, it sent from_pretrained's chat-template listing there, and each call waited out
        # huggingface_hub's retries on "connection refused" (23 s; 130 s of a BLIP-2 LoRA test). Made again here.
        import transformers.utils.hub as transformers_hub

        monkeypatch.setattr(transformers_hub, "_hf_api", None, raising=False)

    # ---- test hooks and inspection ---------------------------------------------------------------
    def fail_next_lfs_uploads(self, count: int = 1, keep_bytes: int = 64) -> None:
        """The next `count` LFS uploads are cut after `keep_bytes` bytes (as a dropped connection would)."""
        with self._lock:
            self._truncate_uploads.extend([keep_bytes] * count)

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.repos[(repo_type, repo_id)]

    def commit_ids(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[str]:
        return [c.oid for c in self.repo(repo_id, repo_type).history(revision)]

    def read_file(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> bytes:
        repo = self.repo(repo_id, repo_type)
        blob = repo.commits[repo.resolve(revision)].files[path]
        return self.lfs_store[blob.sha256] if blob.is_lfs else blob.content

    # ---- accounts --------------------------------------------------------------------------------
    def user_for(self, authorization: str | None) -> str | None:
        if not authorization:
            return None
        token = authorization.removeprefix("Bearer ").strip()
        if token not in self.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.tokens[token]

    def can_write(self, user: str | None, repo_id: str) -> bool:
        namespace = repo_id.split("/")[0]
        return user is not None and (namespace == user or namespace in self.orgs.get(user, []))

    def readable_repo(self, repo_type: str, repo_id: str, user: str | None) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not self.can_write(user, repo_id)):
            # The Hub does not reveal whether a private repo exists.
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        return repo

    def writable_repo(self, repo_type: str, repo_id: str, user: str | None) -> Repo:
        repo = self.readable_repo(repo_type, repo_id, user)
        if not self.can_write(user, repo_id):
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    @staticmethod
    def commit_at(repo: Repo, revision: str) -> Commit:
        oid = repo.resolve(revision)
        if oid is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.commits[oid]

    # ---- repository operations -------------------------------------------------------------------
    def create_repo(self, user: str | None, payload: dict) -> dict:
        if user is None:
            raise HubError(401, "You must be authenticated to create a repository")
        repo_type = payload.get("type") or "model"
        namespace = payload.get("organization") or user
        repo_id = f"{namespace}/{payload['name']}"
        if not self.can_write(user, repo_id):
            raise HubError(403, f"You don't have the rights to create a repository under {namespace}")
        with self._lock:
            if (repo_type, repo_id) in self.repos:
                raise HubError(409, f"You already created this {repo_type} repo: {repo_id}")
            private = payload.get("private", payload.get("visibility") == "private")
            repo = Repo(repo_type, repo_id, bool(private), _now())
            # Like the Hub, a new repository starts with one commit holding .gitattributes.
            content = GITATTRIBUTES.encode()
            self._add_commit(repo, "main", None, "initial commit", "", user,
                             {".gitattributes": Blob(len(content), content=content)})
            self.repos[(repo_type, repo_id)] = repo
        return {"url": f"{self.url}/{URL_PREFIX[repo_type]}{repo_id}", "name": repo_id, "id": repo_id}

    def _add_commit(self, repo, branch, parent, title, message, author, files) -> Commit:
        oid = hashlib.sha1(json.dumps(
            [repo.repo_id, parent, title, message, time.time_ns(), sorted((p, b.blob_id) for p, b in files.items())]
        ).encode()).hexdigest()
        commit = Commit(oid, parent, title, message, author, _now(), files)
        repo.commits[oid] = commit
        repo.branches[branch] = oid
        return commit

    def commit(self, repo: Repo, revision: str, user: str, lines: list[dict]) -> Commit:
        """Apply an ndjson commit atomically: validate every operation first, then write one commit."""
        header = next((line["value"] for line in lines if line.get("key") == "header"), None)
        if header is None or not header.get("summary"):
            raise HubError(400, "Commit header with a summary is required")
        with self._lock:
            head = self.commit_at(repo, revision)
            if revision not in repo.branches:
                raise HubError(400, f"Can only commit to a branch, not to {revision!r}")
            parent_commit = header.get("parentCommit")
            if parent_commit and not head.oid.startswith(parent_commit):
                raise HubError(412, f"Parent commit {parent_commit} is not the head of {revision} ({head.oid})")
            files = dict(head.files)
            for line in lines:
                key, value = line.get("key"), line.get("value", {})
                if key == "file":
                    content = base64.b64decode(value["content"])
                    files[value["path"]] = Blob(len(content), content=content)
                elif key == "lfsFile":
                    sha = value["oid"]
                    if sha not in self.lfs_store:
                        raise HubError(422, f"LFS object {sha} for {value['path']!r} was never uploaded; nothing "
                                            "was committed")
                    files[value["path"]] = Blob(len(self.lfs_store[sha]), sha256=sha)
                elif key == "deletedFile":
                    if files.pop(value["path"], None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    for path in [p for p in files if p.startswith(prefix)]:
                        del files[path]
                elif key != "header":
                    raise HubError(400, f"Unknown commit operation {key!r}")
            return self._add_commit(repo, revision, head.oid, header["summary"], header.get("description", ""),
                                    user, files)

    def upload_mode(self, path: str, size: int, sample: bytes) -> str:
        binary = b"\0" in sample
        return "lfs" if path.endswith(LFS_SUFFIXES) or size >= LFS_SIZE_THRESHOLD or binary else "regular"

    # ---- JSON views --------------------------------------------------------------------------------
    def tree_entry(self, path: str, blob: Blob) -> dict:
        entry = {"type": "file", "oid": blob.blob_id, "size": blob.size, "path": path}
        if blob.is_lfs:
            entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": len(lfs_pointer(blob.sha256, blob.size))}
        return entry

    def repo_info(self, repo: Repo, commit: Commit) -> dict:
        card_data = None
        if "README.md" in commit.files and not commit.files["README.md"].is_lfs:
            card_data = _front_matter(commit.files["README.md"].content.decode())
        config = None
        if "config.json" in commit.files and not commit.files["config.json"].is_lfs:
            try:
                config = json.loads(commit.files["config.json"].content)
            except ValueError:
                config = None
        card_data = card_data or {}
        tags = list(card_data.get("tags") or [])
        return {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.oid,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": tags,
            "library_name": card_data.get("library_name"),
            "pipeline_tag": card_data.get("pipeline_tag"),
            "cardData": card_data or None,
            "config": {k: config[k] for k in ("architectures", "model_type", "auto_map") if k in config}
            if config else None,
            "createdAt": repo.created_at,
            "lastModified": commit.date,
            "siblings": [
                {"rfilename": p, "size": b.size, "blobId": b.blob_id,
                 **({"lfs": {"sha256": b.sha256, "size": b.size, "pointerSize": len(lfs_pointer(b.sha256, b.size))}}
                    if b.is_lfs else {})}
                for p, b in sorted(commit.files.items())
            ],
        }


def _front_matter(text: str) -> dict | None:
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.DOTALL)
    if not match:
        return None
    data = yaml.safe_load(match.group(1))
    return data if isinstance(data, dict) else None


class _HubRequestHandler(BaseHTTPRequestHandler):
    hub: LocalHub
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects

    def log_message(self, format, *args):  # quiet: tests read hub.requests instead
        pass

    # ---- plumbing ----------------------------------------------------------------------------------
    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            return self.rfile.read(length)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, str(value))
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data, status: int = 200, headers: dict | None = None):
        self._send(status, json.dumps(data).encode(), headers)

    def _dispatch(self):
        split = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        segments = [s for s in split.path.split("/") if s]  # still URL-quoted: a revision may hold %2F
        self.hub.requests.append((self.command, split.path))
        body = self._body() if self.command in ("POST", "PUT", "DELETE") else b""
        try:
            user = self.hub.user_for(self.headers.get("Authorization"))
            self._route(segments, user, body)
        except HubError as err:
            headers = {"X-Error-Message": err.message, **err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._json({"error": err.message}, err.status, headers)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    # ---- routes ------------------------------------------------------------------------------------
    def _route(self, seg: list[str], user: str | None, body: bytes):
        hub, method = self.hub, self.command
        if seg[:2] == ["api", "whoami-v2"]:
            if user is None:
                raise HubError(401, "Invalid credentials in Authorization header")
            orgs = [{"name": org, "type": "org"} for org in hub.orgs.get(user, [])]
            return self._json({"type": "user", "name": user, "fullname": user, "orgs": orgs,
                               "auth": {"type": "access_token", "accessToken": {"role": "write"}}})
        if seg[:2] == ["api", "validate-yaml"] and method == "POST":
            return self._validate_yaml(json.loads(body or b"{}"))
        if seg[:3] == ["api", "repos", "create"] and method == "POST":
            return self._json(hub.create_repo(user, json.loads(body)))
        if seg[:3] == ["api", "repos", "delete"] and method == "DELETE":
            payload = json.loads(body)
            repo_id = f"{payload.get('organization') or user}/{payload['name']}"
            hub.writable_repo(payload.get("type") or "model", repo_id, user)
            with hub._lock:
                del hub.repos[(payload.get("type") or "model", repo_id)]
            return self._json({})
        if len(seg) >= 4 and seg[0] == "api" and seg[1] in REPO_TYPES:
            return self._repo_api(REPO_TYPES[seg[1]], f"{seg[2]}/{seg[3]}", seg[4:], user, body)
        if seg[:1] == ["lfs-upload"] and method == "PUT":
            return self._lfs_put(seg[1], body)
        if seg[:1] == ["lfs-objects"] and method in ("GET", "HEAD"):
            data = hub.lfs_store.get(seg[1])
            if data is None:
                raise HubError(404, "LFS object not found")
            return self._send(200, data, {"ETag": f'"{seg[1]}"'}, "application/octet-stream")
        repo_type = "model"
        if seg and seg[0] in ("datasets", "spaces"):
            repo_type, seg = REPO_TYPES[seg[0]], seg[1:]
        if len(seg) >= 2 and seg[1].endswith(".git") and seg[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(repo_type, f"{seg[0]}/{seg[1][:-4]}", user, json.loads(body))
        if len(seg) >= 5 and seg[2] == "resolve" and method in ("GET", "HEAD"):
            path = "/".join(unquote(s) for s in seg[4:])
            return self._resolve(repo_type, f"{seg[0]}/{seg[1]}", unquote(seg[3]), path, user)
        raise HubError(404, f"LocalHub does not implement {method} {self.path}")

    def _repo_api(self, repo_type: str, repo_id: str, rest: list[str], user, body: bytes):
        hub, method = self.hub, self.command
        action = rest[0] if rest else None
        revision = unquote(rest[1]) if len(rest) > 1 else "main"
        if action is None or action == "revision":
            repo = hub.readable_repo(repo_type, repo_id, user)
            return self._json(hub.repo_info(repo, hub.commit_at(repo, revision)))
        if action == "tree":
            repo = hub.readable_repo(repo_type, repo_id, user)
            commit = hub.commit_at(repo, revision)
            return self._json(_tree(commit, unquote("/".join(rest[2:])), self.query.get("recursive") in ("True", "true", "1"), hub))
        if action == "paths-info" and method == "POST":
            repo = hub.readable_repo(repo_type, repo_id, user)
            commit = hub.commit_at(repo, revision)
            payload = _form_or_json(body, self.headers.get("Content-Type", ""))
            paths = payload.get("paths", [])
            paths = [paths] if isinstance(paths, str) else paths
            return self._json([hub.tree_entry(p, commit.files[p]) for p in paths if p in commit.files])
        if action == "refs":
            repo = hub.readable_repo(repo_type, repo_id, user)
            branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": oid} for b, oid in repo.branches.items()]
            return self._json({"branches": branches, "converts": [], "tags": []})
        if action == "commits":
            repo = hub.readable_repo(repo_type, repo_id, user)
            hub.commit_at(repo, revision)
            return self._json([{"id": c.oid, "title": c.title, "message": c.message, "date": c.date,
                                "authors": [{"user": c.author}]} for c in repo.history(revision)])
        if action == "branch" and method == "POST":
            repo = hub.writable_repo(repo_type, repo_id, user)
            payload = json.loads(body or b"{}")
            with hub._lock:
                if revision in repo.branches:
                    raise HubError(409, f"Branch {revision} already exists")
                start = hub.commit_at(repo, payload.get("startingPoint") or "main")
                repo.branches[revision] = start.oid
            return self._json({})
        if action == "preupload" and method == "POST":
            repo = hub.writable_repo(repo_type, repo_id, user)
            commit = hub.commit_at(repo, revision)
            files = []
            for f in json.loads(body)["files"]:
                sample = base64.b64decode(f["sample"])
                existing = commit.files.get(f["path"])
                files.append({"path": f["path"], "uploadMode": hub.upload_mode(f["path"], f["size"], sample),
                              "shouldIgnore": False, "oid": existing.blob_id if existing else None})
            return self._json({"files": files, "commitOid": commit.oid})
        if action == "commit" and method == "POST":
            repo = hub.writable_repo(repo_type, repo_id, user)
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            commit = hub.commit(repo, revision, user, lines)
            url = f"{hub.url}/{URL_PREFIX[repo_type]}{repo_id}/commit/{commit.oid}"
            return self._json({"success": True, "commitOid": commit.oid, "commitUrl": url,
                               "hookOutput": "", "pullRequestUrl": None})
        raise HubError(404, f"LocalHub does not implement {method} /api/{repo_type}s/{repo_id}/{'/'.join(rest)}")

    def _validate_yaml(self, payload: dict):
        try:
            _front_matter(payload.get("content", ""))
        except yaml.YAMLError as err:
            return self._json({"errors": [{"message": f"Invalid YAML: {err}"}], "warnings": []}, 400)
        return self._json({"errors": [], "warnings": []})

    def _lfs_batch(self, repo_type: str, repo_id: str, user, payload: dict):
        hub = self.hub
        if payload.get("operation") == "upload":
            hub.writable_repo(repo_type, repo_id, user)
        else:
            hub.readable_repo(repo_type, repo_id, user)
        objects = []
        for obj in payload.get("objects", []):
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in hub.lfs_store:  # already-stored content needs no upload (no "actions")
                entry["actions"] = {"upload": {"href": f"{hub.storage_url}/lfs-upload/{obj['oid']}",
                                               "header": {}, "expires_in": 3600}}
            objects.append(entry)
        return self._send(200, json.dumps({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}).encode(),
                          content_type="application/vnd.git-lfs+json")

    def _lfs_put(self, oid: str, body: bytes):
        hub = self.hub
        with hub._lock:
            keep = hub._truncate_uploads.pop(0) if hub._truncate_uploads else None
        if keep is not None:
            body = body[:keep]  # the rest never arrived
            raise HubError(400, f"IncompleteBody: received {len(body)} bytes, the upload was interrupted")
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, f"BadDigest: the uploaded content does not match sha256 {oid}")
        with hub._lock:
            hub.lfs_store[oid] = body
        return self._send(200, b"", {"ETag": f'"{oid}"'})

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str, user):
        hub = self.hub
        repo = hub.readable_repo(repo_type, repo_id, user)
        commit = hub.commit_at(repo, revision)
        blob = commit.files.get(path)
        headers = {"X-Repo-Commit": commit.oid, "Accept-Ranges": "bytes"}
        if blob is None:
            raise HubError(404, "Entry not found", "EntryNotFound", headers)
        if blob.is_lfs:
            # The Hub redirects LFS files to its CDN; the client keeps the linked etag/size from this answer.
            location = f"{hub.storage_url}/lfs-objects/{blob.sha256}"
            headers.update({"ETag": f'"{blob.blob_id}"', "X-Linked-Etag": f'"{blob.sha256}"',
                            "X-Linked-Size": blob.size, "Location": location})
            return self._send(302, b"", headers)
        headers["ETag"] = f'"{blob.blob_id}"'
        return self._send(200, blob.content, headers, "application/octet-stream")


def _tree(commit: Commit, path: str, recursive: bool, hub: LocalHub) -> list[dict]:
    prefix = path.strip("/") + "/" if path.strip("/") else ""
    entries, folders = [], set()
    for file_path, blob in sorted(commit.files.items()):
        if not file_path.startswith(prefix):
            continue
        rest = file_path[len(prefix):]
        parts = rest.split("/")
        for depth in range(1, len(parts)):
            folder = prefix + "/".join(parts[:depth])
            if (recursive or depth == 1) and folder not in folders:
                folders.add(folder)
                entries.append({"type": "directory", "oid": git_blob_id(folder.encode()), "size": 0, "path": folder})
        if recursive or len(parts) == 1:
            entries.append(hub.tree_entry(file_path, blob))
    if prefix and not entries:
        raise HubError(404, f"{path} does not exist", "EntryNotFound")
    return entries


def _form_or_json(body: bytes, content_type: str) -> dict:
    if "json" in content_type:
        return json.loads(body or b"{}")
    form = parse_qs(body.decode())
    return {k: v if len(v) > 1 or k == "paths" else v[0] for k, v in form.items()}


__all__ = ["LocalHub", "git_blob_id"]
