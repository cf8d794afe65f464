"""Reads TensorBoard event files back (tests only): checks what crystal's TensorBoard writer
wrote, without TensorFlow or TensorBoard installed."""

import struct
from pathlib import Path

from crystal.errors import MetricsError


def read_tensorboard_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """Scalars of every event file under `logdir`: tag -> [(step, value)], CRCs checked.

    Reads the TFRecord framing directly with tensorboardX's protos, so no TensorFlow or
    TensorBoard install is needed.
    """
    from tensorboardX.proto import event_pb2
    from tensorboardX.record_writer import masked_crc32c
    out: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(Path(logdir).rglob("events.out.tfevents.*")):
        buf = f.read_bytes()
        pos = 0
        while pos + 12 <= len(buf):
            header = buf[pos:pos + 8]
            (n,) = struct.unpack("Q", header)
            (hcrc,) = struct.unpack("I", buf[pos + 8:pos + 12])
            data = buf[pos + 12:pos + 12 + n]
            (dcrc,) = struct.unpack("I", buf[pos + 12 + n:pos + 16 + n])
            if hcrc != masked_crc32c(header) or dcrc != masked_crc32c(data):
                raise MetricsError(f"{f}: corrupt event record at byte {pos}")
            pos += 16 + n
            ev = event_pb2.Event.FromString(data)
            for v in ev.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out
