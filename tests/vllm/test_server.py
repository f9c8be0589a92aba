"""``vllm serve`` with pruning, on 127.0.0.1 only: an OpenAI chat completion with a base64 image
gets the offline engine's answer; a bad override stops the server before it serves, saying why."""

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed in this venv; .ci/vllm-tests.sh runs these tests in a venv of their own")

from vispruner.testbed.model import WEIGHTS  # noqa: E402

from .engines import engine, scene_requests  # noqa: E402

OPTIONS = {"method": "vispruner", "num_tokens": 16}
START_TIMEOUT = 420  # seconds; engine start is about 25 s on a quiet 2-core machine


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _serve(port: int, overrides: dict, log: Path) -> subprocess.Popen:
    command = [
        sys.executable, str(Path(__file__).with_name("vllm_cli.py")), "serve", str(WEIGHTS), "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--max-model-len", "256", "--enforce-eager", "--seed", "0",
        "--hf-overrides", json.dumps({"vispruner": overrides}),
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server as users run it
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)


def _post(port: int, path: str, body: dict) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def _wait_ready(server: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"vllm serve exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                return
        except OSError:
            time.sleep(2)
    pytest.fail(f"vllm serve did not become ready in {START_TIMEOUT} s:\n{log.read_text()[-3000:]}")


def test_chat_completion_with_base64_image_matches_offline(tmp_path):
    request = scene_requests(1)[0]
    question = request.prompt.removeprefix("USER: ").removesuffix(" <image> ASSISTANT:")
    png = io.BytesIO()
    request.images[0].save(png, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    messages = [{"role": "user", "content": [
        {"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": url}},
    ]}]
    port, log = _free_port(), tmp_path / "serve.log"
    server = _serve(port, OPTIONS, log)
    try:
        _wait_ready(server, port, log)
        reply = _post(port, "/v1/chat/completions", {
            "model": str(WEIGHTS), "temperature": 0.0, "max_tokens": 4, "logprobs": True, "messages": messages,
        })
    finally:
        _stop(server)
    served_text = reply["choices"][0]["message"]["content"]
    served_logprobs = [item["logprob"] for item in reply["choices"][0]["logprobs"]["content"]]
    from vllm import SamplingParams

    with engine(vispruner_options=OPTIONS) as llm:
        (offline,) = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=4, logprobs=1), use_tqdm=False)
    done = offline.outputs[0]
    assert reply["usage"]["prompt_tokens"] == len(offline.prompt_token_ids)
    # The chat prompt holds its text and the 16 kept tokens of the image (4 is the <image> id).
    assert offline.prompt_token_ids.count(4) == OPTIONS["num_tokens"]
    assert served_text == done.text
    offline_logprobs = [step[token].logprob for step, token in zip(done.logprobs, done.token_ids)]
    assert max(abs(a - b) for a, b in zip(served_logprobs, offline_logprobs, strict=True)) <= 1e-4


def test_bad_override_stops_server_with_one_clear_line(tmp_path):
    port, log = _free_port(), tmp_path / "serve.log"
    server = _serve(port, {"num_tokens": 0}, log)
    try:
        server.wait(START_TIMEOUT)
    except subprocess.TimeoutExpired:
        _stop(server)
        pytest.fail("vllm serve kept running with a bad override")
    finally:
        _stop(server)
    assert server.returncode != 0
    lines = [line for line in log.read_text().splitlines() if "num_tokens must be an integer >= 1; got 0" in line]
    assert lines, log.read_text()[-3000:]
