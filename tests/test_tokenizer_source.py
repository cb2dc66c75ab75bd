"""Where the front ends' tokenizer comes from: a file, a folder, or a Hugging Face hub repository.

The hub is a local stand-in that answers the two requests the hub client makes (HEAD, then GET
of `/{repo}/resolve/{revision}/tokenizer.json`), so the download path runs for real, offline.
"""

from __future__ import annotations

import hashlib
import http.server
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers
from twinroute.scheduler.openai_queries import Tokenizer, tokenizer_file

REPOSITORY = "acme/tiny-chat"


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    tokenizer = HFTokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(["a tiny corpus for a tiny tokenizer"] * 50, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tokenizer.save(str(path))
    return path.read_bytes()


class FakeHub:
    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.requests: list[tuple[str, str, str | None]] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self, body: bool) -> None:
                hub.requests.append((self.command, self.path, self.headers.get("authorization")))
                data = hub.files.get(self.path)
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
                self.send_header("X-Repo-Commit", "c" * 40)
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub(tokenizer_json: bytes) -> Iterator[FakeHub]:
    fake = FakeHub(
        {
            f"/{REPOSITORY}/resolve/main/tokenizer.json": tokenizer_json,
            f"/{REPOSITORY}/resolve/v2/tokenizer.json": tokenizer_json,
        }
    )
    yield fake
    fake.close()


def resolve(
    hub: FakeHub, home: Path, source: str, *, revision: str | None = None, token: str = ""
) -> subprocess.CompletedProcess[str]:
    """`tokenizer_file` in a fresh process: the hub client reads its environment (the
    endpoint, the cache's home, the token) when it is imported, as it does in a router pod."""
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(home), "PATH": "/usr/bin:/bin"}
    if token:
        env["HF_TOKEN"] = token
    code = (
        "import sys\n"
        "from twinroute.scheduler.openai_queries import Tokenizer, tokenizer_file\n"
        "try:\n"
        f"    path = tokenizer_file({source!r}, revision={revision!r})\n"
        "except ValueError as error:\n"
        "    sys.exit(str(error))\n"
        "print(path)\n"
        "print(len(Tokenizer(path).encode('a tiny corpus')))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )


def test_a_file_or_a_folder_holding_one_is_used_as_it_is(
    tokenizer_json: bytes, tmp_path: Path
) -> None:
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "tokenizer.json").write_bytes(tokenizer_json)
    assert tokenizer_file(str(snapshot / "tokenizer.json")) == str(snapshot / "tokenizer.json")
    assert tokenizer_file(str(snapshot)) == str(snapshot / "tokenizer.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"the folder has no tokenizer\.json"):
        tokenizer_file(str(tmp_path / "empty"))


def test_a_hub_repository_is_fetched_once_and_loads(hub: FakeHub, tmp_path: Path) -> None:
    fetched = resolve(hub, tmp_path, REPOSITORY)
    assert fetched.returncode == 0, fetched.stderr
    path, tokens = fetched.stdout.split()
    assert Path(path).read_bytes() == hub.files[f"/{REPOSITORY}/resolve/main/tokenizer.json"]
    assert Path(path).is_relative_to(tmp_path)
    assert int(tokens) > 0
    assert ("GET", f"/{REPOSITORY}/resolve/main/tokenizer.json", None) in hub.requests
    # The second start finds it in the cache: a HEAD to check it is current, no download.
    file_gets = [r for r in hub.requests if r[0] == "GET" and r[1].endswith("tokenizer.json")]
    assert len(file_gets) == 1
    assert resolve(hub, tmp_path, REPOSITORY).returncode == 0
    assert [r for r in hub.requests if r[0] == "GET" and r[1].endswith("tokenizer.json")] == (
        file_gets
    )


def test_a_revision_and_the_hub_token_are_passed_on(hub: FakeHub, tmp_path: Path) -> None:
    fetched = resolve(hub, tmp_path, REPOSITORY, revision="v2", token="hf_gated_repo_token")
    assert fetched.returncode == 0, fetched.stderr
    assert ("GET", f"/{REPOSITORY}/resolve/v2/tokenizer.json", "Bearer hf_gated_repo_token") in (
        hub.requests
    )


def test_what_cannot_be_loaded_says_what_was_tried(hub: FakeHub, tmp_path: Path) -> None:
    absent = resolve(hub, tmp_path, "acme/absent")
    assert absent.returncode != 0
    assert "tokenizer 'acme/absent': no such file" in absent.stderr
    assert "could not be fetched from the Hugging Face hub" in absent.stderr
    assert "revision 'v9'" in resolve(hub, tmp_path, REPOSITORY, revision="v9").stderr
    with pytest.raises(ValueError, match="not a hub repository id"):
        tokenizer_file(str(tmp_path / "no" / "such" / "tokenizer.json"))
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    with pytest.raises(ValueError, match=r"not a tokenizer\.json"):
        Tokenizer(str(garbage))


def test_the_router_refuses_to_start_on_a_tokenizer_it_cannot_load(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "twinroute",
            "router",
            "--model",
            "m",
            "--embedded",
            "--endpoints",
            "e0=127.0.0.1:9",
            "--port",
            "0",
            "--tokenizer",
            "acme/absent",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert "router: tokenizer 'acme/absent'" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_scheduler_refuses_its_pickers_tokenizer_before_opening_anything(
    tmp_path: Path,
) -> None:
    result = subprocess.run(
        [
            sys.executable, "-m", "twinroute", "scheduler", "--model", "m",
            "--static-endpoints", "e0=127.0.0.1:9", "--grpc-port", "0", "--metrics-port", "0",
            "--picker-port", "0", "--tokenizer", "acme/absent",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 2
    assert "twinroute scheduler: tokenizer 'acme/absent'" in result.stderr
    assert "Unclosed" not in result.stderr
