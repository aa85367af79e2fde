"""`egstalker client URL --audio SPEECH`: stream a speech file through a server as a browser would."""

from __future__ import annotations

import argparse
import os
import sys

HELP = "stream a speech file to an `egstalker serve` server in real time, save what comes back, print timing"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", metavar="URL",
                        help="server address, e.g. http://127.0.0.1:8010 (or its session URL ending in /ws)")
    parser.add_argument("--audio", required=True, metavar="SPEECH", help="speech file (wav, mp3, mp4, ...)")
    parser.add_argument("-o", "--output", metavar="RECEIVED.mp4", help="save the received frames and audio here")
    parser.add_argument("--token", default=os.environ.get("EGSTALKER_TOKEN"),
                        help="the server's token (default: $EGSTALKER_TOKEN)")
    parser.add_argument("--chunk-ms", type=float, default=20.0, help="speech per message (default 20 ms)")
    parser.add_argument("--fast", action="store_true",
                        help="send the speech as fast as possible (an upload) instead of in real time; the server "
                             "still streams it back in real time, at most 1 s ahead")
    parser.add_argument("--pose", choices=("loop", "static"), default=None, help="pose source (server default)")
    parser.add_argument("--json", action="store_true", help="print the statistics as JSON")


def run(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from egstalker.errors import EgstalkerError
    from egstalker.serve.client import load_speech, save_received, stream_speech, websocket_url

    if not 1 <= args.chunk_ms <= 2000:
        raise EgstalkerError("--chunk-ms must be between 1 and 2000")
    websocket_url(args.url)  # a bad address is refused before the speech is read
    audio = load_speech(args.audio)
    if args.output:
        from egstalker.render.video import check_video_output

        check_video_output(args.output, inputs=(args.audio,))  # before streaming, not after
    # progress goes to stderr: stdout holds only the statistics (with --json, one JSON object)
    print(f"streaming {len(audio) / 16000:.2f} s of speech to {args.url} "
          f"({'as fast as possible' if args.fast else 'in real time'}) ...", file=sys.stderr, flush=True)
    stream = asyncio.run(stream_speech(args.url, audio, token=args.token, realtime=not args.fast,
                                       chunk_ms=args.chunk_ms, pose=args.pose))
    stats = stream.timing()
    if args.json:
        print(json.dumps(stats, indent=2), flush=True)
    else:
        _print_stats(stats)
    if not stream.complete:  # nothing half-written: an incomplete stream is not saved
        not_saved = f"; nothing was saved to {args.output}" if args.output else ""
        raise EgstalkerError(f"{_incomplete_reason(stream)}{not_saved}")
    if args.output:
        save_received(stream, args.output)
        repeated = sum(1 for frame in stream.frames if not frame.jpeg)
        note = (f" ({repeated} repeat the image before them: the server's device could not keep up; on a slow "
                "device `egstalker serve --max-lag 0` renders every frame, or `egstalker render` makes the video "
                "offline)" if repeated else "")
        print(f"saved {len(stream.frames)} frames with their audio to {args.output}{note}", file=sys.stderr)
    return 0


def _incomplete_reason(stream) -> str:
    """One line: why the stream is incomplete, at which frame."""
    got, expected = len(stream.frames), stream.expected_frames
    if stream.server_error is not None:
        why = f"the server sent an error: {stream.server_error}"
    elif stream.error is not None:
        why = stream.error
    elif stream.done_frames is not None and stream.done_frames != got:
        why = f"the server said it sent {stream.done_frames} frames"
    else:
        why = f"the server ended the stream after {got} frames"
    if stream.ready is None and not got:
        return why  # the session never started
    return f"stream incomplete at frame {got} of {expected}: {why}"


def _print_stats(s: dict) -> None:
    print(f"frames: {s['frames']} of {s['expected_frames']}")
    if not s["frames"]:
        return
    lat, gap = s["latency_ms"], s["frame_interval_ms"]
    print(f"first frame: {s['first_frame_latency_ms']:.0f} ms after the end of its 40 ms of speech "
          f"({s['first_frame_after_start_ms']:.0f} ms after the first chunk was sent; the model needs "
          f"{s.get('lookahead_ms', 0):.0f} ms of look-ahead)")
    print(f"latency per frame: p50 {lat['p50']:.0f} ms, p95 {lat['p95']:.0f} ms, p99 {lat['p99']:.0f} ms, "
          f"max {lat['max']:.0f} ms")
    print(f"frame interval: p50 {gap['p50']:.1f} ms, p95 {gap['p95']:.1f} ms, max {gap['max']:.1f} ms; "
          f"received at {s['received_fps']} fps; {s['late_frames']} frames late for a "
          f"{s['playout_buffer_ms']:.0f} ms playout buffer; {s['skipped_frames']} without a new image "
          "(server overloaded)")
    offset = s["av_offset_ms"]
    print(f"audio/video offset: {'n/a' if offset is None else f'{offset:.1f} ms'} "
          f"(each frame carries its own speech samples); in order: {s['in_order']}")
