"""Read what W&B logged from an offline run file, without the network or W&B's servers."""
from __future__ import annotations

import json
import struct
from pathlib import Path


def wandb_records(run_file: Path):
    """Yield the `wandb_internal_pb2.Record`s of a `.wandb` file (leveldb log format: 32 KiB blocks
    of records `crc32 <I, length <H, type <B, data`; types FULL=1, FIRST=2, MIDDLE=3, LAST=4)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, chunks = 7, []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:                      # block trailer: zero padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunks.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):                                # FULL, LAST: a record is complete
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def read_wandb_run(run_file: Path) -> dict:
    """run record, config, metric definitions and history rows of one offline run file."""
    out = {"run": None, "config": {}, "metrics": {}, "history": []}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["run"] = record.run
            out["config"].update({u.key: json.loads(u.value_json) for u in record.run.config.update})
        elif kind == "config":
            out["config"].update({u.key: json.loads(u.value_json) for u in record.config.update})
        elif kind == "metric":
            m = record.metric
            out["metrics"][m.name or m.glob_name] = m.step_metric
        elif kind == "history":
            out["history"].append({i.key or ".".join(i.nested_key): json.loads(i.value_json)
                                   for i in record.history.item})
    return out
