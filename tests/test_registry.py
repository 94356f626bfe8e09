"""Model registry, cache and download, against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import socket
import threading

import pytest
import torch

from cpsam_toolkit.network import CPSAMNet, get_config
from cpsam_toolkit.network import registry as reg
from cpsam_toolkit.network.checkpoints import save_checkpoint, save_official

# ------------------------------------------------------------------------------ test server


class ModelServer:
    """Serves ``files`` (name -> bytes) on 127.0.0.1 with Range/If-Range support.

    ``drop_after``: name -> byte count; the next ``drop_times`` answers for that file send the
    full Content-Length but close the connection after that many body bytes.
    ``honour_range=False`` makes the server ignore Range headers (answers 200, whole file).
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.drop_after: dict[str, int] = {}
        self.drop_times = 1
        self.honour_range = True
        self.requests: list[dict] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):  # noqa: N802
                name = self.path.lstrip("/")
                server.requests.append({"path": name, "headers": dict(self.headers)})
                body = server.files.get(name)
                if body is None:
                    self.send_error(404, "no such model")
                    return
                etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
                start, status = 0, 200
                rng = self.headers.get("Range")
                if_range = self.headers.get("If-Range")
                if rng and server.honour_range and (if_range is None or if_range == etag):
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    status = 206
                payload = body[start:]
                self.send_response(status)
                self.send_header("Content-Length", str(len(payload)))
                self.send_header("ETag", etag)
                self.send_header("Accept-Ranges", "bytes")
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.end_headers()
                cut = server.drop_after.get(name)
                if cut is not None and server.drop_times > 0:
                    server.drop_times -= 1
                    self.wfile.write(payload[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(payload)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def tiny_bytes(tmp_path_factory) -> bytes:
    torch.manual_seed(0)
    p = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_official(CPSAMNet(get_config("tiny")), p)
    return p.read_bytes()


@pytest.fixture
def server():
    s = ModelServer()
    yield s
    s.close()


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """A fake HOME and cache; the real ~/.cache/cpsam and ~/.cellpose are never touched."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("CPSAM_HOME", str(tmp_path / "cpsam-cache"))
    for var in ("CELLPOSE_LOCAL_MODELS_PATH", "CPSAM_OFFLINE", "CPSAM_MODEL_URL_BASE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(reg, "_RETRY_DELAY_S", 0.01)
    return home


def closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/"


def add_entry(monkeypatch, name: str, *, url: str, sha256=None, size=None, preset="tiny"):
    entry = reg.ModelEntry(name=name, url=url + name, sha256=sha256, licence="BSD-3-Clause",
                           size_bytes=size, description="test model", preset=preset)
    monkeypatch.setitem(reg.REGISTRY, name, entry)
    return entry


def cache_files() -> list[str]:
    d = reg.cache_dir()
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


# ----------------------------------------------------------------------------------- registry


def test_official_entries():
    assert reg.REGISTRY["cpsam"].url == "https://huggingface.co/mouseland/cellpose-sam/resolve/main/cpsam"
    assert (reg.REGISTRY["cpsam_v2"].url
            == "https://huggingface.co/mouseland/cellpose-sam/resolve/main/cpsam_v2")
    for name in ("cpsam", "cpsam_v2"):
        e = reg.REGISTRY[name]
        assert e.sha256 is None and e.preset == "vit_l" and e.licence == "BSD-3-Clause"
        assert e.file_name == name  # same file name as the reference package's cache
    small = reg.REGISTRY["cpsam_toolkit_small"]
    assert small.packaged and small.preset == "small"
    assert reg.packaged_path(small).parts[-3:] == ("cpsam_toolkit", "models", "cpsam_small.pt")


def test_cache_dir_default_and_env(isolated_env, monkeypatch, tmp_path):
    assert reg.cache_dir() == tmp_path / "cpsam-cache"
    monkeypatch.delenv("CPSAM_HOME")
    assert reg.cache_dir() == isolated_env / ".cache" / "cpsam"


def test_existing_path_returned_as_is(tmp_path, tiny_bytes):
    f = tmp_path / "my weights.pt"
    f.write_bytes(tiny_bytes)
    assert reg.resolve_weights(f) == f
    assert reg.resolve_weights(str(f)) == f


def test_unknown_name_lists_known(tmp_path):
    with pytest.raises(reg.UnknownModelError) as e:
        reg.resolve_weights("cyto9")
    msg = str(e.value)
    assert "cyto9" in msg and "cpsam" in msg and "cpsam_v2" in msg
    with pytest.raises(reg.UnknownModelError, match="does not exist"):
        reg.resolve_weights(tmp_path / "missing.pt")


def test_packaged_model_missing_or_present(monkeypatch, tmp_path, tiny_bytes):
    entry = reg.REGISTRY["cpsam_toolkit_small"]
    monkeypatch.setattr(reg, "packaged_path", lambda e: tmp_path / "models" / e.file_name)
    with pytest.raises(reg.ModelUnavailableError) as e:
        reg.resolve_weights(None)  # the default model
    assert str(tmp_path / "models" / "cpsam_small.pt") in str(e.value)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "cpsam_small.pt").write_bytes(tiny_bytes)
    assert reg.resolve_weights("cpsam_toolkit_small") == tmp_path / "models" / entry.file_name


# ----------------------------------------------------------------------------------- download


def test_download_with_checksum(server, monkeypatch, tiny_bytes):
    server.files["t1"] = tiny_bytes
    sha = hashlib.sha256(tiny_bytes).hexdigest()
    add_entry(monkeypatch, "t1", url=server.url, sha256=sha, size=len(tiny_bytes))
    p = reg.resolve_weights("t1", progress=False)
    assert p == reg.cache_dir() / "t1"
    assert p.read_bytes() == tiny_bytes
    assert reg.read_sidecar(p) == sha
    assert cache_files() == ["t1", "t1.lock", "t1.sha256"]  # no .part left
    # second use: from the cache, no request
    n = len(server.requests)
    assert reg.resolve_weights("t1") == p
    assert len(server.requests) == n
    assert "cpsam-toolkit/" in server.requests[0]["headers"]["User-Agent"]


def test_resume_after_dropped_connection(server, monkeypatch, tiny_bytes):
    server.files["t2"] = tiny_bytes
    server.drop_after["t2"] = 300_000
    sha = hashlib.sha256(tiny_bytes).hexdigest()
    add_entry(monkeypatch, "t2", url=server.url, sha256=sha)
    with pytest.raises(reg.DownloadError) as e:
        reg.download_model("t2", progress=False, retries=0)
    msg = str(e.value)
    assert "interrupted after 300000 of" in msg and "resume" in msg
    part = reg.cache_dir() / "t2.part"
    assert part.stat().st_size == 300_000
    assert not (reg.cache_dir() / "t2").exists()
    # the second call resumes with a Range request and ends byte-identical
    p = reg.resolve_weights("t2", progress=False)
    assert p.read_bytes() == tiny_bytes
    last = server.requests[-1]["headers"]
    assert last["Range"] == "bytes=300000-"
    assert last["If-Range"] == '"' + sha[:16] + '"'
    assert not part.exists()


def test_resume_automatically_within_one_call(server, monkeypatch, tiny_bytes):
    server.files["t3"] = tiny_bytes
    server.drop_after["t3"] = 1000
    add_entry(monkeypatch, "t3", url=server.url, sha256=hashlib.sha256(tiny_bytes).hexdigest())
    p = reg.download_model("t3", progress=False, retries=1)
    assert p.read_bytes() == tiny_bytes
    assert [r["headers"].get("Range") for r in server.requests] == [None, "bytes=1000-"]


def test_server_ignoring_range_gives_full_download(server, monkeypatch, tiny_bytes):
    server.files["t4"] = tiny_bytes
    server.honour_range = False
    add_entry(monkeypatch, "t4", url=server.url, sha256=hashlib.sha256(tiny_bytes).hexdigest())
    reg.cache_dir().mkdir(parents=True)
    (reg.cache_dir() / "t4.part").write_bytes(b"garbage from an older attempt" * 10)
    p = reg.resolve_weights("t4", progress=False)
    assert server.requests[0]["headers"]["Range"] == "bytes=290-"
    assert p.read_bytes() == tiny_bytes


def test_file_changed_on_server_between_attempts(server, monkeypatch, tiny_bytes):
    """If-Range: a resume against a changed file gets the whole new file, not a mix."""
    server.files["t4b"] = bytes(reversed(tiny_bytes))
    server.drop_after["t4b"] = 5000
    add_entry(monkeypatch, "t4b", url=server.url, sha256=hashlib.sha256(tiny_bytes).hexdigest())
    with pytest.raises(reg.DownloadError, match="interrupted"):
        reg.download_model("t4b", progress=False, retries=0)
    server.files["t4b"] = tiny_bytes  # new version published
    p = reg.resolve_weights("t4b", progress=False)
    assert server.requests[-1]["headers"]["Range"] == "bytes=5000-"
    assert p.read_bytes() == tiny_bytes


def test_stale_part_larger_than_file_restarts(server, monkeypatch, tiny_bytes):
    server.files["t5"] = tiny_bytes
    add_entry(monkeypatch, "t5", url=server.url, sha256=hashlib.sha256(tiny_bytes).hexdigest())
    reg.cache_dir().mkdir(parents=True)
    (reg.cache_dir() / "t5.part").write_bytes(b"x" * (len(tiny_bytes) + 10))
    p = reg.resolve_weights("t5", progress=False)  # 416, then a full download
    assert p.read_bytes() == tiny_bytes


def test_checksum_mismatch_deletes_and_raises(server, monkeypatch, tiny_bytes):
    server.files["t6"] = tiny_bytes
    add_entry(monkeypatch, "t6", url=server.url, sha256="0" * 64)
    with pytest.raises(reg.ChecksumError) as e:
        reg.resolve_weights("t6", progress=False)
    msg = str(e.value)
    assert hashlib.sha256(tiny_bytes).hexdigest() in msg and "0" * 64 in msg
    assert "deleted" in msg
    assert [f for f in cache_files() if not f.endswith(".lock")] == []


def test_size_mismatch_deletes_and_raises(server, monkeypatch, tiny_bytes):
    server.files["t7"] = tiny_bytes
    add_entry(monkeypatch, "t7", url=server.url, size=len(tiny_bytes) + 1)
    with pytest.raises(reg.ChecksumError, match="bytes, expected"):
        reg.resolve_weights("t7", progress=False)
    assert [f for f in cache_files() if not f.endswith(".lock")] == []


def test_unknown_sha_structural_check_and_sidecar(server, monkeypatch, tiny_bytes):
    """sha256=None: verified by loading; the SHA-256 is pinned; later corruption is caught."""
    server.files["t8"] = tiny_bytes
    # the registered URL is unreachable: CPSAM_MODEL_URL_BASE redirects to the local server
    add_entry(monkeypatch, "t8", url="https://huggingface.invalid/")
    monkeypatch.setenv("CPSAM_MODEL_URL_BASE", server.url)
    p = reg.resolve_weights("t8", progress=False)
    assert p.read_bytes() == tiny_bytes
    assert reg.sidecar_path(p).read_text() == f"{hashlib.sha256(tiny_bytes).hexdigest()}  t8\n"
    assert reg.resolve_weights("t8") == p
    data = bytearray(tiny_bytes)
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    p.write_bytes(bytes(data))
    with pytest.raises(reg.CorruptModelError) as e:
        reg.resolve_weights("t8")
    assert str(p) in str(e.value) and "--force" in str(e.value)
    # --force fetches it again
    assert reg.download_model("t8", progress=False, force=True).read_bytes() == tiny_bytes
    assert reg.resolve_weights("t8") == p


def test_wrong_content_without_sha_is_rejected(server, monkeypatch, tiny_bytes, tmp_path):
    # random bytes
    server.files["t9"] = bytes(range(256)) * 100
    add_entry(monkeypatch, "t9", url=server.url)
    with pytest.raises(reg.ChecksumError, match="not a valid weights file"):
        reg.resolve_weights("t9", progress=False)
    # a valid network of the wrong size (the server sent another model)
    server.files["t10"] = tiny_bytes
    add_entry(monkeypatch, "t10", url=server.url, preset="small")
    with pytest.raises(reg.ChecksumError, match="expected preset 'small'"):
        reg.resolve_weights("t10", progress=False)
    assert [f for f in cache_files() if not f.endswith(".lock")] == []


def test_http_error(server, monkeypatch):
    add_entry(monkeypatch, "t11", url=server.url)
    with pytest.raises(reg.DownloadError, match="HTTP 404"):
        reg.resolve_weights("t11", progress=False)


def test_offline_message_names_paths(monkeypatch, isolated_env):
    monkeypatch.setenv("CPSAM_OFFLINE", "1")
    with pytest.raises(reg.ModelUnavailableError) as e:
        reg.resolve_weights("cpsam")
    msg = str(e.value)
    assert "CPSAM_OFFLINE" in msg
    assert str(reg.cache_dir() / "cpsam") in msg
    assert str(isolated_env / ".cellpose" / "models" / "cpsam") in msg
    assert "https://huggingface.co/mouseland/cellpose-sam/resolve/main/cpsam" in msg


def test_network_failure_message(monkeypatch, isolated_env, tmp_path):
    monkeypatch.setenv("CPSAM_MODEL_URL_BASE", closed_port_url())
    monkeypatch.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(tmp_path / "cp-models"))
    with pytest.raises(reg.ModelUnavailableError) as e:
        reg.resolve_weights("cpsam_v2", progress=False)
    msg = str(e.value)
    assert "could not be downloaded" in msg
    for place in (reg.cache_dir(), isolated_env / ".cellpose" / "models", tmp_path / "cp-models"):
        assert str(place / "cpsam_v2") in msg
    assert "https://huggingface.co/mouseland/cellpose-sam/resolve/main/cpsam_v2" in msg
    assert not (reg.cache_dir() / "cpsam_v2").exists()


def test_download_false_does_not_touch_network(server, monkeypatch):
    add_entry(monkeypatch, "t12", url=server.url)
    with pytest.raises(reg.ModelUnavailableError, match="not downloaded"):
        reg.resolve_weights("t12", download=False)
    assert server.requests == []


@pytest.mark.parametrize("where", ["home", "env"])
def test_reference_cellpose_cache_is_used(where, server, monkeypatch, isolated_env, tmp_path,
                                          tiny_bytes):
    add_entry(monkeypatch, "t13", url=server.url)
    server.files["t13"] = b"must not be downloaded"
    if where == "home":
        folder = isolated_env / ".cellpose" / "models"
    else:
        folder = tmp_path / "elsewhere"
        monkeypatch.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(folder))
    folder.mkdir(parents=True)
    (folder / "t13").write_bytes(tiny_bytes)
    monkeypatch.setenv("CPSAM_OFFLINE", "1")
    assert reg.resolve_weights("t13") == folder / "t13"
    assert server.requests == []
    assert not (folder / "t13.sha256").exists()  # nothing is written into cellpose's folder
    # a registered SHA-256 is checked for those files too
    add_entry(monkeypatch, "t13", url=server.url, sha256="f" * 64)
    with pytest.raises(reg.CorruptModelError):
        reg.resolve_weights("t13")


def test_hand_placed_file_in_cache_gets_checked(monkeypatch, server, tiny_bytes):
    add_entry(monkeypatch, "t14", url=server.url, preset="small")
    reg.cache_dir().mkdir(parents=True)
    (reg.cache_dir() / "t14").write_bytes(tiny_bytes)  # a tiny net where 'small' is expected
    with pytest.raises(reg.ChecksumError, match="expected preset 'small'"):
        reg.resolve_weights("t14")
    add_entry(monkeypatch, "t14", url=server.url, preset="tiny")
    assert reg.resolve_weights("t14") == reg.cache_dir() / "t14"
    assert reg.read_sidecar(reg.cache_dir() / "t14") == hashlib.sha256(tiny_bytes).hexdigest()


def test_describe(tmp_path):
    torch.manual_seed(0)
    net = CPSAMNet(get_config("tiny"))
    save_checkpoint(net, tmp_path / "ours.pt", meta={"epochs": 3})
    info = reg.describe(tmp_path / "ours.pt")
    assert info["format"] == "cpsam-toolkit" and info["preset"] == "tiny"
    assert info["parameters"] == sum(p.numel() for p in net.parameters())
    assert info["meta"] == {"epochs": 3}
    custom = get_config("tiny").replace(depth=3)
    save_official(CPSAMNet(custom), tmp_path / "custom")
    info = reg.describe(tmp_path / "custom")
    assert info["format"] == "official" and info["preset"] is None
    assert info["config"]["depth"] == 3


# ---------------------------------------------------------------------------------------- CLI


def run_cli(argv, capsys):
    from cpsam_toolkit.cli import main

    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_list_download_info(server, monkeypatch, tiny_bytes, capsys):
    server.files["t20"] = tiny_bytes
    add_entry(monkeypatch, "t20", url=server.url, sha256=hashlib.sha256(tiny_bytes).hexdigest(),
              size=len(tiny_bytes))
    rc, out, _ = run_cli(["models"], capsys)
    assert rc == 0
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.strip()}
    assert "not downloaded" in lines["cpsam"] and "BSD-3-Clause" in lines["cpsam"]
    assert "~1.2 GB" in lines["cpsam"]
    assert "not downloaded" in lines["t20"]

    rc, out, _ = run_cli(["models", "download", "t20", "--no-progress"], capsys)
    assert rc == 0 and out.strip() == str(reg.cache_dir() / "t20")

    rc, out, _ = run_cli(["models", "list", "--json"], capsys)
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["t20"]["path"] == str(reg.cache_dir() / "t20")
    assert rows["cpsam"]["path"] is None

    rc, out, _ = run_cli(["models", "info", "t20"], capsys)
    assert rc == 0
    assert "format:      official" in out and "preset:      tiny" in out
    n = sum(p.numel() for p in CPSAMNet(get_config("tiny")).parameters())
    assert f"{n:,}" in out

    rc, out, _ = run_cli(["models", "info", str(reg.cache_dir() / "t20"), "--json"], capsys)
    assert json.loads(out)["config"]["width"] == 64


def test_cli_errors(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("CPSAM_OFFLINE", "1")
    rc, _, err = run_cli(["models", "download", "cpsam"], capsys)
    assert rc == 1 and "CPSAM_OFFLINE" in err and ".cellpose" in err
    rc, _, err = run_cli(["models", "download", "nope"], capsys)
    assert rc == 1 and "known models" in err
    bad = tmp_path / "bad.pt"
    bad.write_text("not weights")
    rc, _, err = run_cli(["models", "info", str(bad)], capsys)
    assert rc == 1 and str(bad) in err


def test_progress_bar_goes_to_stderr(server, monkeypatch, tiny_bytes, capsys):
    server.files["t21"] = tiny_bytes
    add_entry(monkeypatch, "t21", url=server.url, sha256=hashlib.sha256(tiny_bytes).hexdigest())
    reg.download_model("t21", progress=True)
    out = capsys.readouterr()
    assert out.out == "" and "downloading t21" in out.err


def test_sam_checkpoint_described(tmp_path):
    from segment_anything.modeling import ImageEncoderViT

    enc = ImageEncoderViT(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2,
                          out_chans=16)
    torch.save({"image_encoder." + k: v for k, v in enc.state_dict().items()}, tmp_path / "sam")
    info = reg.describe(tmp_path / "sam")
    assert info["format"] == "segment-anything" and info["config"]["depth"] == 2


# ------------------------------------------------------------------------- default model


def test_default_downloads_published_model_once_then_reuses(server, monkeypatch, tiny_bytes):
    add_entry(monkeypatch, "cpsam_v2", url=server.url)
    server.files["cpsam_v2"] = tiny_bytes
    first = reg.choose_default_model(progress=False)
    assert (first.name, first.reason, first.message) == ("cpsam_v2", "downloaded", None)
    assert first.path == reg.cache_dir() / "cpsam_v2" and first.path.read_bytes() == tiny_bytes
    again = reg.choose_default_model(progress=False)
    assert (again.name, again.reason, again.path) == ("cpsam_v2", "cached", first.path)
    assert [r["path"] for r in server.requests] == ["cpsam_v2"]  # one GET in all

    import cpsam_toolkit as cp

    model = cp.load_model(device="cpu")
    assert model.name == "cpsam_v2" and len(server.requests) == 1


def _assert_fallback(choice, reason):
    assert choice.name == reg.DEFAULT_MODEL and choice.reason == reason and choice.fallback
    assert choice.path == reg.packaged_path(reg.get_entry(reg.DEFAULT_MODEL))
    line = choice.message
    assert "\n" not in line and "cpsam models download cpsam_v2" in line
    assert str(reg.cache_dir()) in line and "CPSAM_HOME" in line
    # the shipped model's accuracy, as its own metadata records it
    assert reg.shipped_accuracy() in line and "AP@0.5 0." in line


def test_default_falls_back_when_server_refuses(monkeypatch):
    monkeypatch.setenv("CPSAM_MODEL_URL_BASE", closed_port_url())
    choice = reg.choose_default_model(progress=False)
    _assert_fallback(choice, "unreachable")
    assert "cannot reach 127.0.0.1" in choice.message
    assert not (reg.cache_dir() / "cpsam_v2").exists()


def test_default_falls_back_fast_when_server_is_silent(monkeypatch):
    """A server that accepts the connection but never answers: given up after the timeout."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)  # connections queue in the backlog; nothing ever answers
    try:
        monkeypatch.setenv("CPSAM_MODEL_URL_BASE", f"http://127.0.0.1:{silent.getsockname()[1]}/")
        choice = reg.choose_default_model(progress=False, connect_timeout=0.3)
    finally:
        silent.close()
    _assert_fallback(choice, "unreachable")
    assert "timed out" in choice.message


def test_default_offline_never_touches_network(server, monkeypatch, caplog):
    add_entry(monkeypatch, "cpsam_v2", url=server.url)
    server.files["cpsam_v2"] = b"never served"
    monkeypatch.setenv("CPSAM_OFFLINE", "1")
    choice = reg.choose_default_model()
    _assert_fallback(choice, "offline")
    assert "CPSAM_OFFLINE" in choice.message

    import cpsam_toolkit as cp

    with caplog.at_level("WARNING", logger="cpsam_toolkit"):
        model = cp.load_model(device="cpu")
    assert model.name == reg.DEFAULT_MODEL
    assert choice.message in caplog.text
    assert server.requests == []


def test_default_prefers_cached_published_model(monkeypatch, isolated_env, tiny_bytes):
    add_entry(monkeypatch, "cpsam", url="http://127.0.0.1:9/")
    d = isolated_env / ".cellpose" / "models"
    d.mkdir(parents=True)
    (d / "cpsam").write_bytes(tiny_bytes)
    monkeypatch.setenv("CPSAM_OFFLINE", "1")
    choice = reg.choose_default_model()
    assert (choice.name, choice.reason, choice.path) == ("cpsam", "cached", d / "cpsam")
