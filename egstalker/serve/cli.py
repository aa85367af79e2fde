"""`egstalker serve MODEL_DIR`: the real-time server (see egstalker.serve.server)."""

from __future__ import annotations

import argparse
import contextlib
import os

from egstalker.render.cli import add_audio_weights_argument
from egstalker.serve.render_process import QUEUE_DEPTH

HELP = "stream a trained head in real time: a browser page at / and WebSocket sessions at /ws"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="a model folder written by `egstalker train`")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; any other needs --token)")
    parser.add_argument("--port", type=int, default=8010, help="TCP port (default 8010)")
    parser.add_argument("--device", default="auto", help="torch device: auto (GPU when present), cpu, cuda, cuda:1")
    parser.add_argument("--max-sessions", type=int, default=16, help="live sessions at once (default 16)")
    parser.add_argument("--token", default=os.environ.get("EGSTALKER_TOKEN"),
                        help="secret clients must send (default: $EGSTALKER_TOKEN); required off localhost")
    parser.add_argument("--max-batch", type=int, default=32,
                        help="frames per render call, across sessions (default 32)")
    parser.add_argument("--jpeg-quality", type=int, default=80, help="JPEG quality of streamed frames (default 80)")
    parser.add_argument("--pose", choices=("loop", "static"), default="loop",
                        help="head pose / torso source: ping-pong over training frames (loop, default), or one frame")
    parser.add_argument("--dataset", metavar="DIR",
                        help="the dataset the model was trained on, if it moved (torso/background source)")
    parser.add_argument("--precision", choices=("auto", "fp32", "fp16"), default="auto",
                        help="deformation network precision (auto: fp16 on CUDA, 74 dB from fp32 and faster; "
                             "fp32 on the CPU; docs/gpu.md)")
    parser.add_argument("--render-process", choices=("auto", "yes", "no"), default="auto",
                        help="render in a child process with its own GIL (auto: on a GPU; docs/gpu.md)")
    parser.add_argument("--render-queue", type=int, default=QUEUE_DEPTH,
                        help=f"render calls waiting at the render process at once (default {QUEUE_DEPTH}: the "
                             "device starts the next batch while the server takes the last; 1 waits for each)")
    parser.add_argument("--max-lag", type=float, default=0.5, metavar="SECONDS",
                        help="overload policy: a frame the device could not render within this many seconds is sent "
                             "with its speech and no new image, so speech and latency hold (default 0.5); 0 renders "
                             "every frame however late (latency then grows on a slow device)")
    parser.add_argument("--idle-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="close a session whose client sent nothing for this long (default 60; not an "
                             "always-on idle session, which lives while its client is connected)")
    parser.add_argument("--encoder-device", default="auto",
                        help="where the speech encoder runs: auto (the render device), cpu, cuda, cuda:1; cpu spares "
                             "the GPU but takes CPU cores, and held fewer streams on an H200 (docs/gpu.md)")
    add_audio_weights_argument(parser)


def run(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import sys

    from egstalker.errors import EgstalkerError
    from egstalker.serve.scheduler import ServeConfig
    from egstalker.serve.server import check_address, check_bind, serve_forever

    check_bind(args.host, args.token)  # before loading the model: fail fast
    if args.max_sessions < 1 or args.max_batch < 1 or args.render_queue < 1:
        raise EgstalkerError("--max-sessions, --max-batch and --render-queue must be at least 1")
    if not 1 <= args.jpeg_quality <= 100:
        raise EgstalkerError("--jpeg-quality must be between 1 and 100")
    if not (args.max_lag >= 0 and args.idle_timeout > 0):  # also refuses nan
        raise EgstalkerError("--max-lag must be >= 0 (0: render every frame) and --idle-timeout > 0 seconds")
    import torch

    from egstalker.devices import resolve_device

    device = resolve_device(args.device)
    encoder_device = device if args.encoder_device == "auto" else resolve_device(args.encoder_device,
                                                                                 "--encoder-device")
    check_address(args.host, args.port)
    encoder_on_cpu = torch.device(encoder_device).type == "cpu"
    from egstalker.inference import TalkingHead
    from egstalker.serve.render_process import ProcessHead

    in_child = args.render_process == "yes" or (args.render_process == "auto" and not device.startswith("cpu"))
    # every batch size once before listening, on a GPU: the first sessions must not pay for kernel loading
    warm_up_sizes = range(1, args.max_batch + 1) if device.startswith("cuda") else ()
    if in_child:
        head = ProcessHead.start(args.model_dir, device=device, dataset_dir=args.dataset, precision=args.precision,
                                 warm_up_sizes=warm_up_sizes, max_batch=args.max_batch,
                                 queue_depth=args.render_queue, audio_weights=args.audio_weights,
                                 encoder_device=encoder_device)
    else:
        head = TalkingHead.from_dir(args.model_dir, device=device, dataset_dir=args.dataset,
                                    precision=args.precision, audio_weights=args.audio_weights,
                                    encoder_device=encoder_device)
        head.preload_torso()  # the first sessions must not wait for torso images
        head.warm_up(warm_up_sizes)
    if encoder_on_cpu and torch.device(device).type != "cpu":
        # torch's CPU ops in this process are then only the encoder's, one merged call at a time (server.py):
        # give it half the cores, leaving the rest to JPEG encoding, the event loop and the render process. Set
        # before the server's worker threads start (a thread keeps the count it first ran with).
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    if not in_child and args.render_queue != QUEUE_DEPTH:
        print("egstalker serve: --render-queue ignored: it sets the queue of a render process (--render-process yes; "
              "the default on a GPU), and this server renders in its own process", file=sys.stderr)
    config = ServeConfig(max_sessions=args.max_sessions, max_batch=args.max_batch, jpeg_quality=args.jpeg_quality,
                         pose=args.pose, max_lag_s=args.max_lag or None, idle_timeout_s=args.idle_timeout)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # SIGTERM (systemd, docker) stops as Ctrl-C does (egstalker.cli.main), so the render process and its shared
    # frames are released rather than left to the resource tracker; while serving, serve_forever takes both
    # signals itself and returns.
    try:
        asyncio.run(serve_forever(head, args.host, args.port, config, args.token, device))
        print("egstalker serve: stopped", file=sys.stderr)
    except OSError as e:  # taken while the model loaded
        raise EgstalkerError(f"cannot listen on {args.host}:{args.port} ({e.strerror}); use an address of this "
                             "machine for --host and a free --port") from None
    except KeyboardInterrupt:
        print("egstalker serve: stopped", file=sys.stderr)
    finally:
        if in_child:
            with _signals_held("egstalker serve: stopping (ending the render process)"):
                head.close()  # cut short by a second Ctrl-C, it would leave its shared frames behind
    return 0


@contextlib.contextmanager
def _signals_held(note: str):
    """Ctrl-C and SIGTERM only print `note` inside this block (main thread only), so a clean-up runs to its end."""
    import signal
    import sys
    import threading

    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return

    def say(signum, frame) -> None:
        print(note, file=sys.stderr, flush=True)

    previous = {signum: signal.signal(signum, say) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
