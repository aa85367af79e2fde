"""What a CTranslate2 model.bin (given as one or more parts, joined in order) holds: its spec, how many tensors it
announces, and which it really contains before the bytes end (a split model missing parts ends early).

Used to check the Whisper conversions found on PyPI for one larger than base (docs: README "What falls short").

Run: python benchmarks/ct2_model_contents.py PART [PART ...]
"""

from __future__ import annotations

import argparse
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("parts", nargs="+", type=Path)
    args = parser.parse_args()
    from egstalker.audio.whisper import _Joined

    stream = _Joined(args.parts)

    def unpack(fmt: str):
        size = struct.calcsize("<" + fmt)
        data = stream.read(size)
        if len(data) != size:
            raise EOFError
        return struct.unpack("<" + fmt, data)

    def string() -> str:
        (n,) = unpack("H")
        return stream.read(n).rstrip(b"\0").decode("utf-8", "replace")

    total = sum(p.stat().st_size for p in args.parts)
    (version,) = unpack("I")
    spec = string()
    unpack("I")
    (count,) = unpack("I")
    print(f"{total} bytes in {len(args.parts)} part(s); format {version}, spec {spec}, {count} tensors announced")
    found, prefixes = [], {}
    try:
        for _ in range(count):
            name = string()
            (rank,) = unpack("B")
            dims = unpack("I" * rank) if rank else ()
            unpack("B")
            (n_bytes,) = unpack("I")
            if len(stream.read(n_bytes)) != n_bytes:
                raise EOFError
            found.append((name, dims))
            prefixes[name.split("/")[0]] = prefixes.get(name.split("/")[0], 0) + 1
    except EOFError:
        pass
    print(f"{len(found)} whole tensors before the end of the bytes: {prefixes}")
    if found:
        print(f"first: {found[0][0]} {found[0][1]}; last whole one: {found[-1][0]} {found[-1][1]}")
    print("complete" if len(found) == count else f"INCOMPLETE: {count - len(found)} tensors missing")


if __name__ == "__main__":
    main()
