"""Read the run record (name, group, tags) of an offline W&B run file (``run-*.wandb``).

The file is W&B's protobuf ``Record`` stream in the LevelDB log format (a 7-byte file header, then
32 KiB blocks of chunks: crc32 (4 bytes), length (2), type (1: full, 2: first, 3: middle, 4: last)).
"""

from __future__ import annotations

import struct
from pathlib import Path

BLOCK = 32768


def records(path: str | Path) -> list[bytes]:
    data = Path(path).read_bytes()
    out, buf, pos = [], b"", 7
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if length == 0 and kind == 0:
            break
        buf += data[pos:pos + length]
        pos += length
        if kind in (1, 4):
            out.append(buf)
            buf = b""
    return out


def run_info(path: str | Path) -> dict:
    from wandb.proto import wandb_internal_pb2 as pb

    for raw in records(path):
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "run":
            return {"name": rec.run.display_name, "group": rec.run.run_group, "tags": list(rec.run.tags)}
    raise ValueError(f"{path}: no run record")
