"""`egstalker serve` / `egstalker client` end to end on CPU: a server on 127.0.0.1, real clients, real speech."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import shared_memory
from pathlib import Path

import cv2
import numpy as np
import pytest
import soundfile as sf

from egstalker.audio import get_encoder
from egstalker.errors import EgstalkerError
from egstalker.serve import protocol
from egstalker.serve.client import stream_speech
from egstalker.serve.features import SessionSpeech
from egstalker.serve.scheduler import ServeConfig, StreamSession
from egstalker.serve.server import (IDLE_FEED_AHEAD_S, IDLE_SILENCE_AHEAD_S, TalkingHeadServer, check_address,
                                    check_bind)
from conftest import shared_media


@pytest.fixture(scope="module")
def small_head(request):
    """The shared small CPU-trained model (EGSTALKER_TEST_MODEL=DIR reuses a model folder built earlier)."""
    from egstalker.inference import TalkingHead

    model_dir = os.environ.get("EGSTALKER_TEST_MODEL") or request.getfixturevalue("small_model")
    return TalkingHead.from_dir(model_dir, device="cpu")


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    wav, rate = sf.read(shared_media("audio/speech_10s_16k.wav"), dtype="float32")
    assert rate == 16000 and wav.ndim == 1
    return wav[:160000]  # exactly 10 s -> 250 frames


class RunningServer:
    """A TalkingHeadServer on a free 127.0.0.1 port, in its own thread and event loop."""

    def __init__(self, head, config: ServeConfig | None = None, token: str | None = None):
        from aiohttp import web

        self.server = None
        started = threading.Event()

        async def main() -> None:
            self.server = TalkingHeadServer(head, config, token=token)
            runner = web.AppRunner(self.server.app(), access_log=None, shutdown_timeout=5.0)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.port = runner.addresses[0][1]
            self.stop = asyncio.Event()
            started.set()
            await self.stop.wait()
            await runner.cleanup()

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(main(),), daemon=True)
        self.thread.start()
        assert started.wait(30), "server did not start"
        self.url = f"http://127.0.0.1:{self.port}"

    def health(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/health", timeout=10) as response:
            return json.loads(response.read())

    def wait_sessions(self, n: int, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            health = self.health()
            if health["sessions"] == n or time.monotonic() > deadline:
                return health
            time.sleep(0.05)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(30)


@pytest.fixture
def running(small_head):
    servers = []

    def start(config: ServeConfig | None = None, token: str | None = None) -> RunningServer:
        # CPU rendering may be slower than real time: the overload policy (skip images) is off unless a test
        # asks for it, so every frame is rendered and can be compared with an offline render.
        servers.append(RunningServer(small_head, config or ServeConfig(max_lag_s=None), token))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def assert_frames_match_offline(head, wav: np.ndarray, stream, frames) -> None:
    """Streamed frames (JPEG) at indices `frames` equal the model's whole-clip render of the same speech: the
    streamed features, the per-session feature windows and the cross-session batches change nothing."""
    features = head.encode_audio(wav)
    frames = np.asarray(sorted(set(int(f) for f in frames)))
    poses = head.pose_schedule(len(features), mode="loop")
    reference = head.render_frames(features, frames, poses[frames]).astype(np.float32)
    streamed = np.stack([cv2.imdecode(np.frombuffer(stream.frames[f].jpeg, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
                         for f in frames]).astype(np.float32)
    difference = np.abs(streamed - reference).mean(axis=(1, 2, 3))
    assert difference.max() < 3.0, f"streamed frames differ from the offline render by up to {difference.max():.1f}"
    # and the frames are not all alike (a constant image would match nothing above by accident)
    assert np.abs(reference - reference.mean(axis=0)).mean() > 0.05


def stream(url: str, audio: np.ndarray, **kwargs):
    """Stream speech through the server; CPU rendering is slower than real time, so allow plenty of time."""
    kwargs.setdefault("timeout_s", 600.0)
    return asyncio.run(stream_speech(url, audio, **kwargs))


# ------------------------------------------------------------------------------------------------ streams
def test_ten_seconds_of_speech_stream_250_frames(running, small_head, speech):
    server = running()
    # The default model (whisper features, 3 future window rows) needs 3 x 40 + 360 ms of speech after a frame.
    assert server.health()["lookahead_ms"] == 480.0
    received = stream(server.url, speech, realtime=True, chunk_ms=20)
    assert received.error is None
    assert received.done_frames == 250 and len(received.frames) == 250
    assert [f.index for f in received.frames] == list(range(250))
    # It streams: frame 0 arrived long before the 10 s of speech had been sent.
    assert received.received[0] - received.started < 5.0
    # Each frame carries exactly the speech of its own 40 ms slot (A/V offset 0 by construction).
    sent = np.frombuffer(protocol.encode_pcm(speech), "<i2") / 32768.0  # the client's own samples, bit for bit
    assert np.array_equal(received.returned_audio(), sent)
    assert received.timing()["av_offset_ms"] == 0.0
    assert_frames_match_offline(small_head, speech, received, [0, 1, 2, 3, 4, 5, 124, 125, 246, 247, 248, 249])
    assert server.wait_sessions(0)["sessions"] == 0


def test_concurrent_clients_get_their_own_streams(running, small_head, speech):
    server = running(ServeConfig(max_sessions=4, max_lag_s=None))
    pieces = [speech[16000:24000], speech[40000:46400], speech[80000:89600]]  # 13, 10 and 15 frames

    async def all_clients():
        return await asyncio.gather(*(stream_speech(server.url, piece, realtime=True, timeout_s=600)
                                      for piece in pieces))

    streams = asyncio.run(all_clients())
    for piece, received in zip(pieces, streams):
        n = (len(piece) + 320) // 640
        assert received.error is None and len(received.frames) == n == received.done_frames
        assert np.abs(received.returned_audio()[:len(piece)] - piece).max() < 1e-3  # its own speech
        assert_frames_match_offline(small_head, piece, received, [0, n // 2, n - 1])
    assert len({received.ready["session"] for received in streams}) == 3
    health = server.wait_sessions(0)
    assert health["frames_rendered"] == sum(len(s.frames) for s in streams)
    assert health["shared_batches"] > 0, "no render call carried frames of several sessions"
    # the sessions' whisper calls go through one merging batcher (docs/gpu.md): counted, at least one per call
    assert health["encoder_device"] == "cpu"
    if small_head.encoder_name == "whisper":
        assert health["encoder_calls_merged"] is not None and health["encoder_calls_merged"] >= 1.0


def test_a_render_process_serves_the_same_frames(request, small_head, speech):
    """Rendering in a child process (own GIL; the default on a GPU) gives the in-process frames, reports a bad
    batch as an error and keeps serving, and says clearly when the process is gone."""
    from egstalker.serve.render_process import ProcessHead

    model_dir = os.environ.get("EGSTALKER_TEST_MODEL") or request.getfixturevalue("small_model")
    head = ProcessHead.start(model_dir, device="cpu", warm_up_sizes=(1, 3), precision="auto", max_batch=4)
    frames_name = head._frames_memory.name
    try:
        assert (head.width, head.audio_future, head.fps) == (small_head.width, small_head.audio_future, 25.0)
        assert head.warm_up_seconds > 0.0 and head.precision == "fp32"  # the child rendered its warm-up batches
        server = RunningServer(head, ServeConfig(max_lag_s=None))
        try:
            piece = speech[16000:28800]  # 20 frames
            received = stream(server.url, piece, realtime=False)
            assert received.error is None and len(received.frames) == 20
            health = server.health()
            assert health["warm_up_s"] > 0.0 and health["precision"] == "fp32"
            assert health["render_queue"] == 2 and 0.0 < health["render_busy"] <= 1.0
            assert_frames_match_offline(small_head, piece, received, [0, 7, 19])
        finally:
            server.close()
        features = small_head.encode_audio(piece)
        with pytest.raises(EgstalkerError, match="rendering failed in the render process: ValueError"):
            head.render_frames(features, [0], [10**6])
        assert np.array_equal(head.render_frames(features, [3, 4], [3, 4]),
                              small_head.render_frames(features, [3, 4], [3, 4]))
        # two callers at once (the server's queue of 2): each gets its own frames, though both wait at the child;
        # 6 frames exceed the 4-frame shared slots and come back through the pipe
        calls = {"small": ([5, 6], [1, 2]), "large": ([0, 1, 2, 3, 4, 5], [9, 8, 7, 6, 5, 4]), "one": ([7], [3])}
        with ThreadPoolExecutor(2) as pool:
            answers = {name: pool.submit(head.render_frames, features, rows, poses)
                       for name, (rows, poses) in calls.items()}
            for name, (rows, poses) in calls.items():
                assert np.array_equal(answers[name].result(), small_head.render_frames(features, rows, poses)), name
        assert len(head.render_log) >= 5 and all(seconds > 0 for _, seconds in head.render_log)
        assert head.healthy
        head._process.kill()
        head._process.join()
        deadline = time.monotonic() + 10  # the answer reader notices the closed pipe within moments
        while head.healthy and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not head.healthy
        with pytest.raises(EgstalkerError, match="render process has stopped"):
            head.render_frames(features, [0], [0])
        with pytest.raises(EgstalkerError, match="render process has stopped"):  # and stays so, clearly
            head.render_frames(features, [0], [0])
    finally:
        head.close()
    with pytest.raises(FileNotFoundError):  # the shared frames are freed
        shared_memory.SharedMemory(name=frames_name)


def test_a_hung_render_process_fails_every_waiting_call(monkeypatch):
    """A render process that stops answering is given up after the timeout and every waiting call fails with a
    clear error, also when a second request is too large for the pipe and its sender is stuck in send."""
    import multiprocessing

    from egstalker.serve import render_process

    monkeypatch.setattr(render_process, "RENDER_TIMEOUT_S", 1.0)
    parent, child = multiprocessing.Pipe()
    taken = threading.Event()

    def hung_child():  # takes the first request, then never reads or answers again
        child.recv()
        taken.set()

    threading.Thread(target=hung_child, daemon=True).start()

    class HungProcess:
        exitcode = None
        alive = True

        def is_alive(self):
            return self.alive

        def kill(self):
            self.alive = False
            child.close()  # as a killed process's end of the pipe closes

        def join(self, timeout=None):
            pass

    memory = shared_memory.SharedMemory(create=True, size=3 * 2 * 4 * 4 * 3)
    head = render_process.ProcessHead(None, HungProcess(), parent, {}, 0.0, memory,
                                      np.ndarray((3, 2, 4, 4, 3), np.uint8, buffer=memory.buf), 2)
    large = np.zeros((200, 512), np.float32)  # 400 kB: more than the pipe holds
    started = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        calls = [pool.submit(head.render_frames, large, [0], [0]) for _ in range(2)]
        for call in calls:
            with pytest.raises(EgstalkerError, match="did not answer within 1 s; restart the server"):
                call.result(timeout=30)
    assert taken.is_set() and time.monotonic() - started < 10
    assert not head.healthy
    with pytest.raises(EgstalkerError, match="did not answer"):  # and later calls fail at once
        head.render_frames(large, [0], [0])
    head.close()


@pytest.mark.parametrize("render_process", ["yes", "no"])
def test_sigterm_stops_the_server_and_its_render_process_cleanly(request, speech, render_process):
    """A service manager's SIGTERM stops `egstalker serve` as Ctrl-C does, also in the middle of a stream and with
    an impatient Ctrl-C 50 ms later (which aborted the process: the render thread was still in torch when the
    interpreter exited): exit code 0, no traceback, the render process gone and its shared frames freed (no leak
    warning from the resource tracker)."""
    import threading

    import signal
    import socket
    import subprocess
    import sys

    model_dir = os.environ.get("EGSTALKER_TEST_MODEL") or request.getfixturevalue("small_model")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    process = subprocess.Popen([sys.executable, "-m", "egstalker", "serve", str(model_dir), "--device", "cpu",
                                "--render-process", render_process, "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        health = None
        while health is None and time.monotonic() < deadline and process.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    health = json.loads(response.read())
            except OSError:
                time.sleep(0.5)
        assert health is not None and health["status"] == "ok", process.poll()
        assert health["render_queue"] == (2 if render_process == "yes" else 1)
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
        render_pids = [int(pid) for pid in children.read_text().split()] if children.exists() else []
        def client_stream():
            with contextlib.suppress(Exception):  # the server goes away mid-stream
                stream(f"http://127.0.0.1:{port}", speech[:48000], realtime=True)

        client = threading.Thread(target=client_stream, daemon=True)
        client.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until the stream's frames are being rendered
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                if json.loads(response.read())["frames_rendered"] > 10:
                    break
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    # 0; or killed by the second signal after everything was closed, as the interpreter exits (it restores the
    # default handlers first)
    assert process.returncode in (0, -signal.SIGINT), stderr[-2000:]
    assert "egstalker serve: stopped" in stderr and "leaked" not in stderr, stderr[-2000:]
    assert "Traceback" not in stderr and "never retrieved" not in stderr and "terminate" not in stderr, stderr[-2000:]
    after = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    assert not {name for name in after - before if name.startswith("psm_")}
    deadline = time.monotonic() + 10  # the render process (and the resource tracker) end with the server
    while any(Path(f"/proc/{pid}").exists() for pid in render_pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in render_pids if Path(f"/proc/{pid}").exists()]


def test_a_signal_ends_serve_forever_without_interrupting_a_running_task(small_head, capsys):
    """Ctrl-C / SIGTERM while a task is mid-step: serve_forever returns (the CLI then prints "stopped") instead of
    a KeyboardInterrupt tearing through that task (which asyncio reported at exit as a traceback), and puts the
    signal handlers it found back (a second signal during the clean-up still cleans up). Port 0: it prints the port
    the system picked."""
    import re
    import signal

    from egstalker.serve.server import serve_forever

    async def main():
        ready = asyncio.Event()
        serving = asyncio.create_task(serve_forever(small_head, "127.0.0.1", 0, ServeConfig(), None, "cpu",
                                                    ready=ready))
        await asyncio.wait_for(ready.wait(), 60)
        signal.raise_signal(signal.SIGINT)
        busy_until = time.monotonic() + 0.3  # a task mid-step when the signal arrives (the render loop, say)
        while time.monotonic() < busy_until:
            pass
        await asyncio.wait_for(serving, 30)
        return serving

    previous = signal.getsignal(signal.SIGINT)
    try:
        serving = asyncio.run(main())
        assert signal.getsignal(signal.SIGINT) is previous
    finally:
        signal.signal(signal.SIGINT, previous)
    assert serving.done() and serving.exception() is None
    port = int(re.search(r"http://127\.0\.0\.1:(\d+)/", capsys.readouterr().out).group(1))
    assert 0 < port < 65536


def test_a_render_process_that_died_stops_the_server_with_its_reason(small_head, speech, capsys):
    """A render process killed (by the out-of-memory killer, say) can render nothing more: the session in flight
    gets the error, `/health` answers 503 (a supervisor's check reads the status code), and the server stops with
    that one-line reason instead of accepting sessions that all fail."""
    import urllib.error

    from egstalker.serve.server import serve_forever

    class DeadRenderProcess:
        healthy = True

        def __init__(self, head):
            self._head = head

        def __getattr__(self, name):
            return getattr(self._head, name)

        def render_frames(self, *args, **kwargs):
            self.healthy = False
            raise EgstalkerError("the render process has stopped (exit code -9); restart the server")

    unhealthy = DeadRenderProcess(small_head)
    unhealthy.healthy = False
    server = RunningServer(unhealthy, ServeConfig(max_lag_s=None))
    try:
        with pytest.raises(urllib.error.HTTPError) as answer:
            server.health()
        assert answer.value.code == 503
        assert json.loads(answer.value.read())["status"] == "render process stopped"
    finally:
        server.close()

    async def stream_until_it_stops(head, reason: str):
        """Serve `head`, stream a second of speech, and expect the server to stop with `reason`."""
        ready = asyncio.Event()
        serving = asyncio.create_task(serve_forever(head, "127.0.0.1", 0, ServeConfig(max_lag_s=None), None, "cpu",
                                                    ready=ready))
        await asyncio.wait_for(ready.wait(), 60)
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)/", capsys.readouterr().out).group(1))
        received = await stream_speech(f"http://127.0.0.1:{port}", speech[:16000], realtime=False, timeout_s=60)
        with pytest.raises(EgstalkerError, match=f"^{re.escape(reason)}; the server stopped$"):
            await asyncio.wait_for(serving, 30)
        return received

    died = "the render process has stopped (exit code -9); restart the server"
    received = asyncio.run(stream_until_it_stops(DeadRenderProcess(small_head), died))
    assert received.server_error == f"rendering failed: {died}"
    # died while idle: no render call fails, the next session finds it and stops the server
    refused = asyncio.run(stream_until_it_stops(unhealthy, "the render process has stopped; restart the server"))
    assert refused.server_error.startswith("the render process has stopped; restart the server; the server is stopping")


def test_the_render_process_resolves_precision_for_its_own_device(monkeypatch):
    """'auto' means fp16 for a CUDA render process, though the server's own copy of the model is on the CPU; that
    copy's audio encoder runs on the render device (a speech model on the CPU would limit the streams)."""
    from egstalker.inference import TalkingHead
    from egstalker.serve.render_process import ProcessHead

    asked = []

    class Stop(Exception):
        pass

    def from_dir(model_dir, device="cpu", dataset_dir=None, check_encoder=True, precision="fp32",
                 audio_weights=None, encoder_device=None):
        asked.append((device, precision, encoder_device, audio_weights))
        raise Stop  # before any process is spawned

    monkeypatch.setattr(TalkingHead, "from_dir", from_dir)
    for device, expected in (("cuda", "fp16"), ("cuda:1", "fp16"), ("cpu", "fp32")):
        with pytest.raises(Stop):
            ProcessHead.start("unused", device=device, precision="auto", audio_weights="w.bin")
        assert asked.pop() == ("cpu", expected, device, "w.bin")
    with pytest.raises(Stop):
        ProcessHead.start("unused", device="cuda", precision="fp32")
    assert asked.pop() == ("cpu", "fp32", "cuda", None)


def test_an_upload_faster_than_real_time_is_paced(running, speech):
    server = running(ServeConfig(max_ahead_s=0.2, max_lag_s=None))
    received = stream(server.url, speech[:12800], realtime=False)  # 0.8 s sent at once
    assert len(received.frames) == 20 and received.error is None
    # frames are rendered no earlier than real time allows (+ the 0.2 s head start), counted from the upload
    # (a loaded machine only delays frames, so this holds whatever else runs)
    start = received.chunk_sent[0]
    early = [k for k, t in enumerate(received.received) if t - start < k / 25 - 0.2 - 0.05]
    assert not early, f"frames {early} arrived before real time allows"


class SlowDevice:
    """The head on a device that renders 10 frames/s at most (each call waits 0.1 s per frame)."""

    def __init__(self, head):
        self._head = head

    def __getattr__(self, name):
        return getattr(self._head, name)

    def render_frames(self, features, frame_indices, pose_indices, background=None):
        time.sleep(0.1 * len(frame_indices))
        return self._head.render_frames(features, frame_indices, pose_indices, background)


def test_an_overloaded_device_skips_images_not_speech(small_head, speech):
    """A device far slower than 25 fps: with the overload policy a real-time session still gets every
    frame's speech in time (frames without a new image), instead of falling further and further behind."""
    server = RunningServer(SlowDevice(small_head), ServeConfig(max_lag_s=0.3))
    try:
        _check_overload(server, speech)
    finally:
        server.close()


def _check_overload(server, speech):
    piece = speech[16000:48000]  # 2 s, 50 frames
    received = stream(server.url, piece, realtime=True)
    assert received.error is None and len(received.frames) == 50
    assert [f.index for f in received.frames] == list(range(50))
    assert np.abs(received.returned_audio() - piece).max() < 1e-3
    timing = received.timing()
    assert 0 < timing["skipped_frames"] < 50 and received.frames[0].jpeg
    # bounded lag: the last frame comes soon after the speech ends (rendering all 50 would take far longer)
    assert received.received[-1] - received.chunk_sent[-1] < 3.0
    assert server.health()["frames_skipped"] == timing["skipped_frames"]


# ------------------------------------------------------------------------------------------------ robustness
async def _raw_session(url: str, first: str | bytes | None = '{"type": "start"}', then: list = ()) -> list[dict]:
    """Open a socket, send `first` then `then`, return the JSON messages received until it closes.

    Like a browser, it waits for the server's answer to `start` before sending more. A server may hang up
    while a message is still being sent (one over the WebSocket size limit): what came before still counts.
    """
    import aiohttp

    got = []

    def keep(msg) -> None:
        if msg.type == aiohttp.WSMsgType.TEXT:
            got.append(json.loads(msg.data))

    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{url}/ws") as ws:
            try:
                for i, message in enumerate(([first] if first is not None else []) + list(then)):
                    if isinstance(message, bytes):
                        await ws.send_bytes(message)
                    else:
                        await ws.send_str(message)
                    if i == 0 and message == '{"type": "start"}':
                        keep(await ws.receive())
            except ConnectionError:
                pass
            async for msg in ws:
                keep(msg)
    return got


def test_bad_messages_and_abrupt_disconnects_leave_others_streaming(running, speech):
    import aiohttp

    server = running(ServeConfig(max_sessions=8, max_lag_s=None))
    good_audio = speech[16000:28800]  # 20 frames

    async def abrupt_disconnect():
        session = aiohttp.ClientSession()
        ws = await session.ws_connect(f"{server.url}/ws")
        await ws.send_str('{"type": "start"}')
        await ws.send_bytes(protocol.encode_pcm(speech[:16000]))
        await asyncio.sleep(0.3)
        ws._response.connection.transport.abort()  # no close handshake: like a crashed browser tab
        await session.close()

    async def scenario():
        good = asyncio.create_task(stream_speech(server.url, good_audio, realtime=True, timeout_s=600))
        await asyncio.sleep(0.3)
        bad = await asyncio.gather(
            _raw_session(server.url, then=[b"\x01\x02\x03"]),                      # odd byte count
            _raw_session(server.url, first=b"\x00\x00"),                          # audio before start
            _raw_session(server.url, first="hello"),                              # not JSON
            _raw_session(server.url, then=['{"type": "dance"}']),                 # unknown control
            _raw_session(server.url, first='{"type": "start", "sample_rate": 44100}'),  # a setting we lack
            _raw_session(server.url, then=[bytes(protocol.MAX_AUDIO_BYTES + 2)]),  # too big
            _raw_session(server.url, then=[bytes(2**20)]),                        # far too big: dropped
            abrupt_disconnect(),
        )
        return await good, bad

    good, bad = asyncio.run(scenario())
    assert good.error is None and len(good.frames) == 20 == good.done_frames
    odd, early, not_json, unknown, rate, too_big, giant, _ = bad
    assert rate == [{"type": "error", "message": "unknown key(s) sample_rate in start; it takes only idle, pose, "
                                                 "token, type (speech is always 16 kHz mono int16 PCM)"}]
    assert odd[-1]["type"] == "error" and "int16" in odd[-1]["message"]
    assert early[-1]["type"] == "error" and "start" in early[-1]["message"]
    assert not_json[-1]["type"] == "error" and "JSON" in not_json[-1]["message"]
    assert unknown[-1]["type"] == "error" and "unknown" in unknown[-1]["message"]
    assert too_big[-1]["type"] == "error" and "byte limit" in too_big[-1]["message"]
    assert giant[-1]["type"] == "ready"  # closed by the WebSocket layer (1009) after `ready`, nothing else
    health = server.wait_sessions(0)
    assert health["status"] == "ok" and health["sessions"] == 0
    # and it still serves
    again = stream(server.url, speech[:3200], realtime=False)
    assert len(again.frames) == 5 and again.error is None


async def _idle_session(url: str, talk) -> tuple[list, list[dict]]:
    """Open an idle session, run `await talk(ws, frames, ready)` while collecting what comes back, and return the
    frames and the JSON messages (`ready` first) once the server closes the socket."""
    import aiohttp

    frames, texts = [], []
    async with aiohttp.ClientSession() as client:
        async with client.ws_connect(f"{url}/ws") as ws:
            await ws.send_str('{"type": "start", "idle": true}')
            texts.append(json.loads((await ws.receive()).data))

            async def collect() -> None:
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        frames.append(protocol.unpack_frame(msg.data))
                    elif msg.type == aiohttp.WSMsgType.TEXT:
                        texts.append(json.loads(msg.data))

            collector = asyncio.create_task(collect())
            await talk(ws, frames, texts[0])
            await asyncio.wait_for(collector, 300)
    return frames, texts


def test_an_idle_session_fills_silence_between_utterances_and_interrupt_drops_held_speech(running, speech):
    """LiveTalking-style: an idle session streams frames before and between utterances (silence: the head keeps
    moving), plays an utterance sent all at once from the next frame without speech, and `interrupt` drops the
    speech it holds but has not begun (barge-in); `end` finishes it with `done`."""
    server = running(ServeConfig(max_lag_s=None))
    utterance, long_one = speech[16000:32000], speech[40000:168000]  # 1 s, then 8 s that is interrupted

    async def talk(ws, frames, ready) -> None:
        await asyncio.sleep(1.0)  # nothing to say yet
        await ws.send_bytes(protocol.encode_pcm(utterance))
        await asyncio.sleep(2.0)
        for start in range(0, len(long_one), 16000):  # in 1 s messages, all at once
            await ws.send_bytes(protocol.encode_pcm(long_one[start:start + 16000]))
        await asyncio.sleep(1.0)
        await ws.send_str('{"type": "interrupt"}')
        await asyncio.sleep(0.5)
        await ws.send_str('{"type": "end"}')

    frames, texts = asyncio.run(_idle_session(server.url, talk))
    assert texts[0]["type"] == "ready" and [t["type"] for t in texts[1:]] == ["interrupted", "done"], texts
    assert [f.index for f in frames] == list(range(len(frames))) and texts[-1]["frames"] == len(frames)
    assert 4.5 < len(frames) / 25 < 7.0  # about the session's 4.5 s + the look-ahead: frames kept coming
    played = np.frombuffer(b"".join(f.pcm for f in frames), "<i2").astype(np.int32)
    said = np.frombuffer(protocol.encode_pcm(utterance), "<i2").astype(np.int32)
    first = int(np.flatnonzero(played)[0]) - int(np.flatnonzero(said)[0])
    # silence until it was sent, and for what the server had already given the model: the look-ahead + 0.1 s
    given_ahead = texts[0]["lookahead_ms"] / 1000 + IDLE_SILENCE_AHEAD_S
    assert abs(first / 16000 - (1.0 + given_ahead)) < 0.15
    assert np.array_equal(played[first:first + len(said)], said)  # played whole, unchanged
    rest = played[first + len(said):]
    long_said = np.frombuffer(protocol.encode_pcm(long_one), "<i2").astype(np.int32)
    second = int(np.flatnonzero(rest)[0]) - int(np.flatnonzero(long_said)[0])
    assert abs(second / 16000 - 1.0) < 0.15  # sent 2 s after the 1 s utterance: 1 s of silence between
    cut = texts[1]["frame"] * 640 - (first + len(said) + second)  # samples before the frame `interrupted` names
    kept = int(np.flatnonzero(rest[second:second + len(long_said)] != long_said[:len(rest) - second])[0])
    assert cut - 640 < kept <= cut  # the long one played unchanged up to within that frame's slot ...
    # ... which is 1 s of its 8 s (interrupted 1 s after it was sent), + what the server had given ahead of time
    assert abs(kept / 16000 - (1.0 + IDLE_FEED_AHEAD_S - IDLE_SILENCE_AHEAD_S)) < 0.15
    assert not rest[second + kept:].any()  # then silence: none of the dropped speech
    assert server.wait_sessions(0)["sessions"] == 0


def test_an_idle_session_joins_speech_streamed_in_real_time_without_gaps(running, speech):
    """A microphone in an idle session: 20 ms chunks in real time, some up to 60 ms late, play back to back (no
    silence spliced in between chunks), and more than `max_held_s` waiting is refused with a message."""
    import random

    server = running(ServeConfig(max_lag_s=None, max_held_s=5.0))
    said = speech[16000:64000]  # 3 s

    async def talk(ws, frames, ready) -> None:
        opened = time.monotonic()
        await asyncio.sleep(0.5)
        jitter, t0 = random.Random(0), time.monotonic()
        for k, start in enumerate(range(0, len(said), 320)):
            late = jitter.uniform(0.0, 0.06)
            await asyncio.sleep(max(0.0, t0 + (k + 1) * 0.02 + late - time.monotonic()))
            await ws.send_bytes(protocol.encode_pcm(said[start:start + 320]))
        # until the frames of the last chunk (the session's clock + the look-ahead) have come back
        due = (time.monotonic() - opened + ready["lookahead_ms"] / 1000 + 0.3) * 25
        while len(frames) < due:
            await asyncio.sleep(0.05)
        for start in range(0, 2 * len(said), 16000):  # 6 s at once, in 1 s messages: over max_held_s
            with contextlib.suppress(ConnectionError):
                await ws.send_bytes(protocol.encode_pcm(np.tile(said, 2)[start:start + 16000]))

    frames, texts = asyncio.run(_idle_session(server.url, talk))
    assert texts[-1] == {"type": "error", "message": "more than 5 s of speech waiting to play; send the next "
                                                     "utterance when the last has begun"}
    played = np.frombuffer(b"".join(f.pcm for f in frames), "<i2").astype(np.int32)
    sent = np.frombuffer(protocol.encode_pcm(said), "<i2").astype(np.int32)
    first = int(np.flatnonzero(played)[0]) - int(np.flatnonzero(sent)[0])
    assert np.array_equal(played[first:first + len(sent)], sent)  # every chunk right after the one before


def test_idle_session_messages_are_checked(running):
    server = running(ServeConfig(max_lag_s=None))

    async def scenario():
        return await asyncio.gather(
            _raw_session(server.url, first='{"type": "start", "idle": "yes"}'),
            _raw_session(server.url, then=['{"type": "interrupt"}']),
            _raw_session(server.url, first='{"type": "start", "idle": true}',
                         then=['{"type": "end"}', '{"type": "interrupt"}']),
        )

    not_bool, not_idle, after_end = asyncio.run(scenario())
    assert not_bool == [{"type": "error", "message": "idle must be true or false"}]
    assert not_idle[-1] == {"type": "error", "message": 'interrupt needs a session started with "idle": true; to '
                                                       "stop an utterance of this one, close the socket"}
    assert after_end[-1]["type"] in ("done", "error")  # `end` may finish it before the interrupt arrives
    if after_end[-1]["type"] == "error":
        assert after_end[-1]["message"] == 'interrupt sent after {"type": "end"}'


def test_over_limit_sessions_are_refused_with_a_message(running, speech):
    import aiohttp

    server = running(ServeConfig(max_sessions=2, max_lag_s=None))

    async def scenario():
        async with aiohttp.ClientSession() as session:
            holders = [await session.ws_connect(f"{server.url}/ws") for _ in range(2)]
            for ws in holders:
                await ws.send_str('{"type": "start"}')
                assert json.loads((await ws.receive()).data)["type"] == "ready"
            refused = await _raw_session(server.url)
            await holders[0].close()
            for _ in range(100):  # the freed slot becomes available
                if server.server.health()["sessions"] < 2:
                    break
                await asyncio.sleep(0.05)
            accepted = await stream_speech(server.url, speech[:3200], realtime=False, session=session,
                                           timeout_s=600)
            await holders[1].close()
            return refused, accepted

    refused, accepted = asyncio.run(scenario())
    assert refused == [{"type": "error", "message": "server full: all 2 sessions are in use; try again later"}]
    assert accepted.error is None and len(accepted.frames) == 5


def test_idle_sessions_are_closed_and_free_their_slot(running):
    server = running(ServeConfig(max_sessions=1, idle_timeout_s=0.5, max_lag_s=None))
    silent = asyncio.run(_raw_session(server.url))  # starts, then sends nothing
    assert silent[0]["type"] == "ready" and silent[-1]["type"] == "error" and "no message" in silent[-1]["message"]
    assert server.wait_sessions(0)["sessions"] == 0


def test_keep_alive_pings_do_not_count_as_activity(running, speech):
    """The idle timeout counts only the client's own messages: a client that answers and sends WebSocket pings
    (its heartbeat) but nothing else is closed after `idle_timeout_s`, whether it sent no speech at all or half a
    second of it. aiohttp's `receive(timeout=...)` restarts on every ping/pong, which kept such sessions forever."""
    import aiohttp

    server = running(ServeConfig(max_sessions=2, idle_timeout_s=1.0, max_lag_s=None))

    async def keep_alive_only(audio: np.ndarray | None) -> tuple[list[dict], float]:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{server.url}/ws") as ws:
                await ws.send_str('{"type": "start"}')
                if audio is not None:
                    await ws.send_bytes(protocol.encode_pcm(audio))
                last_sent = time.monotonic()

                async def heartbeat() -> None:  # pings, and pongs as if answering the server's pings
                    while True:
                        await asyncio.sleep(0.1)
                        await ws.ping()
                        await ws.pong()

                beating = asyncio.create_task(heartbeat())
                got = []

                async def collect() -> None:
                    async for msg in ws:
                        if msg.type == aiohttp.WSMsgType.TEXT:
                            got.append(json.loads(msg.data))

                try:
                    await asyncio.wait_for(collect(), 8.0)
                except asyncio.TimeoutError:
                    pytest.fail(f"the session was still open 8 s after the client's last message: {got}")
                finally:
                    beating.cancel()
                    with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                        await beating
                return got, time.monotonic() - last_sent

    async def both():
        return await asyncio.gather(keep_alive_only(None), keep_alive_only(speech[16000:24000]))

    for got, closed_after in asyncio.run(both()):
        assert got[0]["type"] == "ready", got
        assert got[-1] == {"type": "error", "message": 'no message for 1 s; send speech, or {"type": "end"} when done'}
        assert 0.9 < closed_after < 5.0
    assert server.wait_sessions(0)["sessions"] == 0


def test_token_is_enforced(running, speech):
    server = running(token="s3cret")
    assert server.health()["token_required"] is True
    missing = asyncio.run(_raw_session(server.url))
    wrong = asyncio.run(_raw_session(server.url, first='{"type": "start", "token": "guess"}'))
    assert "token" in missing[-1]["message"] and "token" in wrong[-1]["message"]
    ok = stream(server.url, speech[:3200], token="s3cret", realtime=False)
    assert ok.error is None and len(ok.frames) == 5


def test_binding_beyond_localhost_needs_a_token():
    check_bind("127.0.0.1", None)
    check_bind("0.0.0.0", "s3cret")
    with pytest.raises(EgstalkerError, match="--token"):
        check_bind("0.0.0.0", None)
    from egstalker.cli import main

    assert main(["serve", "no/such/model", "--host", "0.0.0.0", "--token", ""]) == 2


def test_an_address_the_server_cannot_listen_on_is_refused_before_the_model_loads():
    import socket

    from egstalker.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(EgstalkerError, match=rf"127.0.0.1:{port}: the port is in use; choose another --port"):
            check_address("127.0.0.1", port)
    check_address("127.0.0.1", port)  # free again
    with pytest.raises(EgstalkerError, match="--port 70000 is not a TCP port"):
        check_address("127.0.0.1", 70000)
    with pytest.raises(EgstalkerError, match="--host no.such.host.invalid does not resolve"):
        check_address("no.such.host.invalid", 8010)
    assert main(["serve", "no/such/model", "--port", "-1"]) == 2  # refused before the model folder is read


@pytest.mark.parametrize("flag", ["--device", "--encoder-device"])
def test_a_bad_device_is_a_one_line_error_naming_its_flag(capsys, flag):
    from egstalker.cli import main

    assert main(["serve", "no/such/model", flag, "gpu"]) == 2
    err = capsys.readouterr().err
    assert f"{flag} 'gpu' is not a torch device" in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_cross_origin_pages_cannot_open_sessions_without_a_token(running):
    import aiohttp

    server = running()

    async def connect(origin: str) -> int:
        async with aiohttp.ClientSession() as session:
            try:
                async with session.ws_connect(f"{server.url}/ws", headers={"Origin": origin}):
                    return 101
            except aiohttp.WSServerHandshakeError as e:
                return e.status

    assert asyncio.run(connect("http://evil.example")) == 403
    assert asyncio.run(connect(server.url)) == 101

    # DNS rebinding: a page at evil.example whose name now points at 127.0.0.1 sends its own name as Host and as
    # Origin, so the Origin matches; the Host does not name this machine
    async def rebound(path: str) -> int:
        host = f"evil.example:{server.port}"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{server.url}{path}", headers={"Host": host, "Origin": f"http://{host}",
                                                                   "Connection": "Upgrade", "Upgrade": "websocket",
                                                                   "Sec-WebSocket-Version": "13",
                                                                   "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
                                   ) as response:
                return response.status

    assert asyncio.run(rebound("/ws")) == 403 and asyncio.run(rebound("/health")) == 403
    from egstalker.serve.server import _names_loopback

    assert [_names_loopback(h) for h in ("localhost:8010", "127.0.0.2", "[::1]:8010", "[::ffff:127.0.0.1]:80",
                                         "evil.example", "[::1", "10.0.0.1:8010", "")] == [True] * 4 + [False] * 4
    for name in ("localhost", "127.0.0.1", "[::1]"):  # this machine's names are served
        request = urllib.request.Request(f"{server.url}/health", headers={"Host": f"{name}:{server.port}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200


# ------------------------------------------------------------------------------------------------ parts
def test_streamed_features_equal_whole_clip_features(speech):
    encoder = get_encoder("oww")
    wav = speech[:40000]
    whole = encoder.encode(wav)
    session = SessionSpeech(encoder.encode_stream())
    rng = np.random.default_rng(0)
    at = 0
    while at < len(wav):  # ragged chunks, encoded whenever a few arrived
        step = int(rng.integers(100, 5000))
        session.push(wav[at:at + step])
        at += step
        if rng.random() < 0.5:
            session.update()
    session.finish()
    session.update()
    assert session.n_final == len(whole) == session.n_frames_total
    np.testing.assert_allclose(session.rows(np.arange(len(whole))), whole, atol=1e-4)
    np.testing.assert_array_equal(session.frame_audio(3), wav[1920:2560])


def test_client_cli_saves_an_mp4_with_audio(running, speech, tmp_path, capsys):
    import av

    from egstalker.cli import main

    server = running()
    wav_path = tmp_path / "speech.wav"
    sf.write(wav_path, speech[16000:24000], 16000)
    out = tmp_path / "received.mp4"
    assert main(["client", server.url, "--audio", str(wav_path), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "frames: 13 of 13" in printed and "first frame:" in printed and "audio/video offset: 0.0 ms" in printed
    with av.open(str(out)) as container:
        assert container.streams.video and container.streams.audio
        assert sum(1 for _ in container.decode(video=0)) == 13


def test_client_cli_json_prints_only_json_on_stdout(running, speech, tmp_path, capsys):
    from egstalker.cli import main

    server = running()
    wav_path = tmp_path / "speech.wav"
    sf.write(wav_path, speech[16000:24000], 16000)
    out = tmp_path / "received.mp4"
    assert main(["client", server.url, "--audio", str(wav_path), "-o", str(out), "--json"]) == 0
    printed = capsys.readouterr()
    stats = json.loads(printed.out)  # the whole of stdout is one JSON object
    assert stats["frames"] == stats["expected_frames"] == 13 and stats["error"] is None
    assert "streaming 0.50 s of speech" in printed.err and f"saved 13 frames with their audio to {out}" in printed.err
    assert out.exists()


class FailingDevice:
    """The head on a device that fails every render call after the first `good` frames."""

    def __init__(self, head, good: int):
        self._head, self._left = head, good

    def __getattr__(self, name):
        return getattr(self._head, name)

    def render_frames(self, features, frame_indices, pose_indices, background=None):
        self._left -= len(frame_indices)
        if self._left < 0:
            raise RuntimeError("device lost")
        return self._head.render_frames(features, frame_indices, pose_indices, background)


def test_client_cli_saves_nothing_of_an_incomplete_stream(small_head, speech, tmp_path, capsys):
    """A server that stops mid-stream (Ctrl-C: it closes with 1001), or that fails and sends an error: the client
    saves no partial video and says in one line why the stream is incomplete, at which frame, and that nothing was
    saved."""
    from egstalker.cli import main

    wav_path = tmp_path / "speech.wav"
    sf.write(wav_path, speech[16000:80000], 16000)  # 4 s: 100 frames
    out = tmp_path / "received.mp4"

    server = RunningServer(small_head, ServeConfig(max_lag_s=None))
    try:
        def stop_after_some_frames() -> None:
            deadline = time.monotonic() + 60
            while server.health()["frames_rendered"] < 5 and time.monotonic() < deadline:
                time.sleep(0.05)
            server.close()

        stopper = threading.Thread(target=stop_after_some_frames, daemon=True)
        stopper.start()
        assert main(["client", server.url, "--audio", str(wav_path), "-o", str(out)]) == 2
        stopper.join(60)
    finally:
        server.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("streaming 4.00 s"), err  # progress, then one error line
    assert re.fullmatch(r"egstalker client: error: stream incomplete at frame \d+ of 100: the server closed the "
                        r"connection \(code 1001: server shutting down\); nothing was saved to " + re.escape(str(out)),
                        err[1]), err[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["speech.wav"]  # no video, no temporary file

    server = RunningServer(FailingDevice(small_head, good=8), ServeConfig(max_lag_s=None, max_batch=4))
    try:
        assert main(["client", server.url, "--audio", str(wav_path), "-o", str(out), "--fast", "--json"]) == 2
    finally:
        server.close()
    printed = capsys.readouterr()
    assert json.loads(printed.out)["error"] == "rendering failed: device lost"
    error = printed.err.strip().splitlines()[-1]
    assert re.fullmatch(r"egstalker client: error: stream incomplete at frame [0-8] of 100: the server sent an "
                        r"error: rendering failed: device lost; nothing was saved to " + re.escape(str(out)),
                        error), error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["speech.wav"]


def test_client_refuses_a_page_address_and_names_a_server_that_is_not_there(speech, tmp_path, capsys):
    """A URL naming a page (/health) is refused before anything is sent (it was silently replaced by /ws), and a
    port where nothing listens is said in words."""
    import socket

    from egstalker.cli import main

    wav_path = tmp_path / "speech.wav"
    sf.write(wav_path, speech[:3200], 16000)
    assert main(["client", "http://127.0.0.1:8010/health", "--audio", str(wav_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        "egstalker client: error: 'http://127.0.0.1:8010/health' names the page /health; give the server's address "
        "alone, e.g. http://127.0.0.1:8010 (sessions go to /ws), or its full session URL ending in /ws")
    from egstalker.serve.client import websocket_url

    assert websocket_url("https://example.org/talk/ws") == "wss://example.org/talk/ws"  # behind a proxy's prefix
    assert websocket_url("127.0.0.1:8010/") == "ws://127.0.0.1:8010/ws"
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    assert main(["client", f"http://127.0.0.1:{port}/", "--audio", str(wav_path)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"egstalker client: error: cannot connect to 127.0.0.1:{port} (Connection refused); is `egstalker serve` "
        "running there?")


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless test needs a system chromium")
def test_page_streams_a_file_in_headless_chromium(running, tmp_path):
    server = running()
    wav_path = tmp_path / "speech.wav"
    wav, _ = sf.read(shared_media("audio/speech_10s_16k.wav"), dtype="float32")
    sf.write(wav_path, wav[16000:32000], 16000)  # 1 s: 25 frames
    with chromium_page(server.url) as (page, errors):
        not_audio = tmp_path / "notes.wav"
        not_audio.write_text("not audio")
        page.set_input_files("#file", str(not_audio))
        page.click("#play")  # said, and kept on screen (it was overwritten by "stopped"); no session taken
        page.wait_for_function("window.egsStats.state === 'error'", timeout=30000)
        assert page.evaluate("document.getElementById('status').textContent").startswith(
            "cannot decode notes.wav: ")
        assert server.health()["sessions_served"] == 0
        page.set_input_files("#file", str(wav_path))
        page.click("#play")
        page.wait_for_function("window.egsStats.framesPainted >= 3", timeout=120000)
        first = page.evaluate(CANVAS_DIGEST)
        page.wait_for_function("window.egsStats.framesPainted >= 15", timeout=120000)
        second = page.evaluate(CANVAS_DIGEST)
        if os.environ.get("EGSTALKER_SERVE_SCREENSHOT"):  # docs/serve_page.png is made this way
            page.screenshot(path=os.environ["EGSTALKER_SERVE_SCREENSHOT"])
        page.wait_for_function("window.egsStats.state === 'done'", timeout=120000)
        stats = page.evaluate("window.egsStats")
    assert not errors
    assert stats["framesReceived"] == 25 and stats["error"] is None
    assert first != second, "the canvas did not change: frames are not moving"


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless test needs a system chromium")
def test_page_always_on_idles_takes_files_and_interrupts_in_headless_chromium(running, tmp_path):
    server = running()
    wav_path = tmp_path / "speech.wav"
    wav, _ = sf.read(shared_media("audio/speech_10s_16k.wav"), dtype="float32")
    sf.write(wav_path, wav[16000:64000], 16000)  # 3 s
    with chromium_page(server.url) as (page, errors):
        page.check("#idle")
        page.set_input_files("#file", str(wav_path))
        page.click("#play")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('always on: sent')",
                               timeout=60000)
        assert page.is_enabled("#interrupt") and page.is_enabled("#play") and page.is_disabled("#idle")
        page.wait_for_function("window.egsStats.framesPainted >= 10", timeout=120000)
        page.click("#interrupt")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('interrupted')",
                               timeout=60000)
        page.click("#play")  # the same session takes another file
        page.wait_for_function("document.getElementById('status').textContent === 'sent speech.wav'",
                               timeout=60000)
        received = page.evaluate("window.egsStats.framesReceived")
        page.wait_for_function(f"window.egsStats.framesReceived >= {received + 25}", timeout=120000)
        assert server.health()["sessions"] == 1 and server.health()["sessions_served"] == 1
        page.click("#stop")
        stats = page.evaluate("window.egsStats")
    assert not errors and stats["error"] is None and stats["state"] == "stopped"
    assert server.wait_sessions(0)["sessions"] == 0


class PortraitHead:
    """The small (square) model as a portrait one: the middle 9:16 of its frames (54x96)."""

    def __init__(self, head):
        self._head = head
        self.width = head.height * 9 // 16

    def __getattr__(self, name):
        return getattr(self._head, name)

    def render_frames(self, features, frame_indices, pose_indices, background=None):
        images = self._head.render_frames(features, frame_indices, pose_indices, background)
        left = (images.shape[2] - self.width) // 2
        return np.ascontiguousarray(images[:, :, left:left + self.width])


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless test needs a system chromium")
def test_page_shows_frames_unstretched_and_releases_microphone_and_sound(small_head, tmp_path):
    """A portrait model's frames are shown at their own aspect ratio (the stage was a square); a microphone session
    the server refuses releases the microphone (it stayed open: it was handed to the session only at `ready`), as
    Stop does; Stop, and a new session, close the sound of the last one (each session left an AudioContext
    playing)."""
    head = PortraitHead(small_head)
    server = RunningServer(head, ServeConfig(max_lag_s=None), token="s3cret")
    wav_path = tmp_path / "speech.wav"
    wav, _ = sf.read(shared_media("audio/speech_10s_16k.wav"), dtype="float32")
    sf.write(wav_path, wav[16000:28800], 16000)  # 0.8 s: 20 frames
    all_closed = "window.egsContexts.length > 0 && window.egsContexts.every((c) => c.state === 'closed')"
    all_released = "window.egsMicrophones.every((s) => s.getTracks().every((t) => t.readyState === 'ended'))"
    try:
        with chromium_page(server.url, ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"],
                           TRACK_AUDIO) as (page, errors):
            # the stage takes the model's shape from /health, before any session
            assert page.evaluate(STAGE_RATIO) == pytest.approx(54 / 96, rel=0.02)

            page.click("#mic")  # no token: the server refuses the session
            page.wait_for_function("window.egsStats.state === 'error'", timeout=30000)
            assert "token" in page.evaluate("window.egsStats.error")
            page.wait_for_function(f"window.egsMicrophones.length === 1 && {all_released}", timeout=5000)

            page.fill("#token", "s3cret")
            page.click("#mic")  # accepted: the (fake) microphone streams until Stop, which releases it
            page.wait_for_function("window.egsStats.framesReceived >= 3", timeout=120000)
            page.click("#stop")
            page.wait_for_function(f"window.egsMicrophones.length === 2 && {all_released} && {all_closed}",
                                   timeout=5000)

            page.set_input_files("#file", str(wav_path))
            page.click("#play")
            page.wait_for_function("window.egsStats.state === 'done' && window.egsStats.framesPainted > 0",
                                   timeout=120000)
            assert page.evaluate("[document.getElementById('stage').width, "
                                 "document.getElementById('stage').height]") == [54, 96]
            assert page.evaluate(STAGE_RATIO) == pytest.approx(54 / 96, rel=0.02)
            finished = page.evaluate("window.egsContexts.length")
            page.click("#play")  # a new session: the last one's sound is closed
            page.wait_for_function("window.egsStats.framesReceived >= 1", timeout=120000)
            assert page.evaluate(f"window.egsContexts.slice(0, {finished}).every((c) => c.state === 'closed')")
            assert page.evaluate("window.egsContexts.at(-1).state") == "running"
            page.click("#stop")  # and Stop silences the sound still queued
            page.wait_for_function(all_closed, timeout=5000)
    finally:
        server.close()
    assert not errors


TRACK_AUDIO = """(() => {
  // the test's view of the page's sound and microphone: every AudioContext and microphone stream it opens
  window.egsContexts = []; window.egsMicrophones = [];
  const Context = window.AudioContext;
  window.AudioContext = class extends Context {
    constructor(...args) { super(...args); window.egsContexts.push(this); }
  };
  if (navigator.mediaDevices) {
    const getUserMedia = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
    navigator.mediaDevices.getUserMedia = async (constraints) => {
      const stream = await getUserMedia(constraints);
      window.egsMicrophones.push(stream);
      return stream;
    };
  }
})();"""
STAGE_RATIO = "(() => { const r = document.getElementById('stage').getBoundingClientRect(); return r.width / r.height; })()"
@contextlib.contextmanager
def chromium_page(url: str, extra_args: list[str] = (), init_script: str | None = None):
    """(page, errors): headless chromium on the served page once it shows the server's fps, and the page's
    uncaught errors so far (the list goes on filling while the page is open)."""
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS + list(extra_args))
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            if init_script:
                page.add_init_script(init_script)
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('server').textContent.includes('fps')")
            yield page, errors
        finally:
            browser.close()


CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--autoplay-policy=no-user-gesture-required"]
CANVAS_DIGEST = """() => { const c = document.getElementById('stage');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let h = 0; for (let i = 0; i < d.length; i += 7) h = (h * 31 + d[i]) >>> 0; return h; }"""


def test_block_features_are_released_at_one_steady_look_ahead():
    """whisper finishes 5 frames at once (a 200 ms block + 200 ms of its window's future). By features alone
    frames 0-1 of a block would be renderable 120 ms before frames 2-4 (whose 3 future rows lie in the next block),
    so a stream would start ahead of its steady latency and a player's 150 ms buffer would lose 120 ms of it.
    Each frame waits for its own speech + the server's look-ahead (120 ms of rows + 360 ms): equally late."""
    from types import SimpleNamespace

    speech = SimpleNamespace(n_final=0, n_samples=0, n_frames_total=None)
    session = StreamSession(id="s", features=speech, right_reach=3, pose=None, lookahead_s=0.48)
    for heard_ms, final, expected in ((400, 5, 0),    # block 0 is final; frame 0 needs speech to 40 + 480 ms
                                      (520, 5, 1),    # frame 0's look-ahead has arrived
                                      (560, 5, 2),    # frame 1's
                                      (599, 5, 2),    # frame 2 needs block 1 (and 600 ms) anyway
                                      (600, 10, 3),   # block 1 final: features would allow 7, speech allows 3
                                      (1000, 20, 13)):
        speech.n_samples, speech.n_final = heard_ms * 16, final
        assert session.renderable_limit() == expected, heard_ms
    # without a look-ahead (or at the end of the utterance) the features alone decide
    assert StreamSession(id="t", features=speech, right_reach=3, pose=None).renderable_limit() == 17
    speech.n_frames_total = 25
    speech.n_final = 25
    assert session.renderable_limit() == 25
