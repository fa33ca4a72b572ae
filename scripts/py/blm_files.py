"""Readers for barrierlm's files, standard library only (no torch, no numpy needed):

  read_checkpoint(path)   checkpoint.bin, the layout documented in core/checkpoint.h:
                          header (magic "BLMCKPT\\0", version u32, header length u32 = 24,
                          file length u64), sections (tag, length u64, payload), trailer
                          ("END!", 8, FNV-1a 64 of every byte before the checksum field).
                          Only CONF (YAML), TOKN, STAT and TENS are interpreted.
  read_gradients_dir(dir) what `barrierlm gradients` writes (cmd/commands_dev.h): result.json,
                          batch.bin (int32 inputs then targets, [B, T] each, little-endian),
                          grads.bin (float32 [P], little-endian).

Raw float/int data is returned as bytes (little-endian), for torch.frombuffer or array.array.
Every problem raises FormatError with a one-line message naming the file.
"""
import json
import os
import struct

MAGIC = b"BLMCKPT\0"
VERSION = 1
HEADER_BYTES = 24
TRAILER_BYTES = 20
# Above this size the pure-Python checksum (about 10 MB/s) is skipped and said so.
CHECKSUM_LIMIT_BYTES = 64 << 20


class FormatError(Exception):
    pass


def fnv1a64(data):
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def _parse_scalar(text):
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1].strip()
        return [_parse_scalar(t) for t in inner.split(",")] if inner else []
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def parse_config_yaml(text, source):
    """The CONF section: YAML as config_to_yaml writes it ("section:" then "  key: value").
    PyYAML when installed; else a reader for exactly that two-level form."""
    try:
        import yaml
        doc = yaml.safe_load(text)
    except ImportError:
        doc, section = {}, None
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if not line.startswith(" ") and line.rstrip().endswith(":"):
                section = doc.setdefault(line.strip()[:-1], {})
            elif section is not None and ":" in line:
                key, value = line.strip().split(":", 1)
                section[key.strip()] = _parse_scalar(value)
            else:
                raise FormatError(f"{source}: config line {n} is not 'section:' or '  key: value'")
    if not isinstance(doc, dict):
        raise FormatError(f"{source}: the config is not a YAML mapping")
    return doc


def model_config(conf, source):
    """{n_layer, n_head, d_model, seq_len, vocab_size} from a parsed config."""
    model = conf.get("model")
    if not isinstance(model, dict):
        raise FormatError(f"{source}: the config has no 'model' section")
    out = {}
    for key in ("n_layer", "n_head", "d_model", "seq_len", "vocab_size"):
        value = model.get(key)
        if not isinstance(value, int) or value < 1:
            raise FormatError(f"{source}: model.{key} is {value!r}, expected a positive integer")
        out[key] = value
    if out["d_model"] % out["n_head"]:
        raise FormatError(f"{source}: model.d_model {out['d_model']} is not a multiple of model.n_head")
    return out


def barrier_layers(value, n_layer, source):
    """barrier.layers as a sorted list of indices ("all", absent or [] -> every layer)."""
    if value is None or value == "all" or value == []:
        return list(range(n_layer))
    if isinstance(value, int):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, int) and 0 <= v < n_layer for v in value):
        raise FormatError(f"{source}: barrier.layers {value!r} is not 'all' or a list of layers in [0, {n_layer})")
    return sorted(set(value))


class _Cursor:
    """Reads little-endian fields from data[pos:end]; running past end is a FormatError."""

    def __init__(self, data, pos, end, what):
        self.data, self.pos, self.end, self.what = data, pos, end, what

    def take(self, n):
        if n < 0 or self.pos + n > self.end:
            raise FormatError(f"{self.what}: truncated (needs {n} bytes at offset {self.pos}, "
                              f"section ends at {self.end})")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u32(self):
        return struct.unpack("<I", self.take(4))[0]

    def u64(self):
        return struct.unpack("<Q", self.take(8))[0]

    def i64(self):
        return struct.unpack("<q", self.take(8))[0]


def _read_header(data, path):
    if len(data) < HEADER_BYTES + TRAILER_BYTES:
        raise FormatError(f"{path}: {len(data)} bytes, too short for a checkpoint")
    if data[:8] != MAGIC:
        raise FormatError(f"{path}: not a barrierlm checkpoint (wrong magic)")
    version, header_len, file_len = struct.unpack("<IIQ", data[8:24])
    if version != VERSION:
        raise FormatError(f"{path}: checkpoint format version {version}, this reader knows {VERSION}")
    if header_len != HEADER_BYTES:
        raise FormatError(f"{path}: header length {header_len}, expected {HEADER_BYTES}")
    if file_len != len(data):
        raise FormatError(f"{path}: header says {file_len} bytes, the file has {len(data)}")


def _verify_trailer(data, path, verify_checksum):
    """True when the checksum was verified, False when skipped for size."""
    trailer = data[len(data) - TRAILER_BYTES:]
    if trailer[:4] != b"END!" or struct.unpack("<Q", trailer[4:12])[0] != 8:
        raise FormatError(f"{path}: bad trailer")
    if not verify_checksum or len(data) > CHECKSUM_LIMIT_BYTES:
        return False
    stored = struct.unpack("<Q", trailer[12:20])[0]
    if fnv1a64(data[:len(data) - 8]) != stored:
        raise FormatError(f"{path}: checksum mismatch (file corrupted)")
    return True


def _read_tensors(cur):
    tensors = []
    for _ in range(cur.u32()):
        name = cur.take(cur.u32()).decode("utf-8", "replace")
        rank = cur.u32()
        if rank > 8:
            raise FormatError(f"{cur.what}: tensor '{name}' has rank {rank}")
        shape = tuple(cur.u64() for _ in range(rank))
        count = 1
        for s in shape:
            count *= s
        tensors.append((name, shape, cur.take(4 * count)))
    if cur.pos != cur.end:
        raise FormatError(f"{cur.what}: {cur.end - cur.pos} bytes after the last tensor")
    return tensors


def read_checkpoint(path, verify_checksum=True):
    """{config, model, barrier_layers, tokenizer, step, tensors: [(name, shape, bytes)],
    checksum_verified}."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror})")
    _read_header(data, path)
    verified = _verify_trailer(data, path, verify_checksum)
    sections, pos, end = {}, HEADER_BYTES, len(data) - TRAILER_BYTES
    while pos < end:
        head = _Cursor(data, pos, end, f"{path}: section header at offset {pos}")
        tag = head.take(4).decode("ascii", "replace")
        length = head.u64()
        if head.pos + length > end:
            raise FormatError(f"{path}: section {tag} ({length} bytes) runs past the trailer")
        sections.setdefault(tag, (head.pos, head.pos + length))
        pos = head.pos + length
    for tag in ("CONF", "TENS"):
        if tag not in sections:
            raise FormatError(f"{path}: no {tag} section")
    a, b = sections["CONF"]
    conf = parse_config_yaml(data[a:b].decode("utf-8"), f"{path} (CONF)")
    model = model_config(conf, f"{path} (CONF)")
    barrier = conf.get("barrier") or {}
    out = {
        "config": conf,
        "model": model,
        "barrier_layers": barrier_layers(barrier.get("layers"), model["n_layer"], f"{path} (CONF)"),
        "tensors": _read_tensors(_Cursor(data, *sections["TENS"], f"{path} (TENS)")),
        "checksum_verified": verified,
        "tokenizer": None,
        "step": None,
    }
    if "TOKN" in sections:
        a, b = sections["TOKN"]
        out["tokenizer"] = data[a:b].decode("utf-8", "replace")
    if "STAT" in sections:
        out["step"] = _Cursor(data, *sections["STAT"], f"{path} (STAT)").i64()
    return out


RESULT_KEYS = ("B", "T", "loss", "ce", "barrier", "min_logdet", "barrier_terms", "lambda", "eps",
               "barrier_layers", "model", "backend", "layout", "num_params")


def _read_exact(path, nbytes, what):
    try:
        size = os.path.getsize(path)
        if size != nbytes:
            raise FormatError(f"{path}: {size} bytes, expected {nbytes} ({what})")
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror})")


def read_gradients_dir(directory):
    """{result (dict), inputs, targets (bytes, int32 [B, T]), grads (bytes, float32 [P])}."""
    path = os.path.join(directory, "result.json")
    try:
        with open(path) as f:
            result = json.load(f)
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror}); run `barrierlm gradients ... --out {directory}` first")
    except ValueError as e:
        raise FormatError(f"{path}: not valid JSON ({e})")
    missing = [k for k in RESULT_KEYS if k not in result]
    if missing:
        raise FormatError(f"{path}: missing keys {', '.join(missing)}")
    B, T, P = result["B"], result["T"], result["num_params"]
    batch = _read_exact(os.path.join(directory, "batch.bin"), 8 * B * T,
                        f"int32 inputs and targets of {B} x {T}")
    grads = _read_exact(os.path.join(directory, "grads.bin"), 4 * P, f"float32 x {P} parameters")
    return {"result": result, "inputs": batch[:4 * B * T], "targets": batch[4 * B * T:],
            "grads": grads}
