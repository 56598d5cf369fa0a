"""Storage of a sparse, weight-shared layer as Deep Compression stores it, bit for bit.

Han et al. 2015 / 2016 (survey-cnn-compression.txt, "Putting it all together"; sep-net-slides.txt,
"Weight Pruning Implementation"):
- Sparse weights: the positions of the kept weights in the flattened layer, each stored as its gap
  from the previous one in `gap_bits` bits (8 for conv layers, 5 for fully connected ones). A gap over
  2**gap_bits is bridged by a filler zero: an entry whose value is zero, placed 2**gap_bits after the
  previous entry (the slides' example: kept positions 1, 4, 15 with 3-bit gaps need a filler at 12).
  We count the first gap from position -1, so that a weight at position 0 can be stored (the slides
  count it from 0: their first gap is 1 where ours is 2; entries and fillers are the same).
- Shared weights: each entry's value is an index into the layer's codebook of log2(k) bits; index 0
  is the exact zero (fillers, and weights pruned to zero), the other k - 1 codes are trained centroids.
- Huffman coding of the index stream and of the gap stream, each with its own canonical code; the
  code-length tables are stored too (one byte per symbol) and counted.
Every stage's bits are counted the same way (`layer_bits`), and `encode` / `decode` write and read them
for real, so the counts are those of a file that a decoder turns back into the same weights.
"""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np

FLOAT_BITS = 32
TABLE_BITS = 20  # Huffman decoding by one table lookup per symbol up to codes this long (2**20 entries)


def gaps(positions: Sequence[int], gap_bits: int) -> tuple[list[int], list[bool]]:
    """The gap of each entry (kept positions, ascending, plus fillers) and which entries are fillers.
    A stored gap is in 1..2**gap_bits (written as gap - 1)."""
    p = np.asarray(positions, np.int64).reshape(-1)
    if not p.size:
        return [], []
    gap = p - np.concatenate([[-1], p[:-1]])
    if (gap < 1).any():
        raise ValueError("positions must be ascending and distinct")
    span = 1 << gap_bits
    fillers = (gap - 1) // span  # filler entries before each kept one, each a full span
    last = np.cumsum(fillers + 1) - 1  # where each kept entry lands
    out = np.full(int(last[-1]) + 1, span, np.int64)
    out[last] = gap - fillers * span
    filler = np.ones(len(out), bool)
    filler[last] = False
    return out.tolist(), filler.tolist()


def positions(gap_list: Iterable[int]) -> list[int]:
    """Every entry's position (fillers included) from its gaps."""
    return (np.cumsum(np.asarray(list(gap_list), np.int64)) - 1).tolist()


def huffman_lengths(symbols: Iterable[int]) -> dict[int, int]:
    """Code length of each symbol of a canonical Huffman code for these symbols' frequencies
    (one symbol alone gets a 1-bit code)."""
    counts = Counter(symbols)
    if not counts:
        return {}
    if len(counts) == 1:
        return {next(iter(counts)): 1}
    heap = [(n, i, (s,)) for i, (s, n) in enumerate(sorted(counts.items()))]
    heapq.heapify(heap)
    depth = Counter()
    tie = len(heap)
    while len(heap) > 1:
        n1, _, a = heapq.heappop(heap)
        n2, _, b = heapq.heappop(heap)
        for s in a + b:
            depth[s] += 1
        heapq.heappush(heap, (n1 + n2, tie, a + b))
        tie += 1
    return dict(depth)


def canonical_codes(lengths: dict[int, int]) -> dict[int, tuple[int, int]]:
    """symbol -> (code, length) of the canonical Huffman code with these lengths."""
    code, prev_len, out = 0, 0, {}
    for s, n in sorted(lengths.items(), key=lambda kv: (kv[1], kv[0])):
        code <<= n - prev_len
        out[s] = (code, n)
        code += 1
        prev_len = n
    return out


class BitWriter:
    """Fields of fixed or Huffman widths, most significant bit first. Whole bytes are packed as each
    field array arrives, so memory holds the packed output plus one array's bits, not a byte per bit
    of the file (AlexNet's 58M weights would need gigabytes)."""

    def __init__(self) -> None:
        self.packed: list[bytes] = []
        self.pending = np.zeros(0, np.uint8)  # fewer than 8 bits not yet packed

    def _add(self, bits: np.ndarray) -> None:
        bits = np.concatenate([self.pending, bits]) if self.pending.size else bits
        whole = bits.size - bits.size % 8
        self.packed.append(np.packbits(bits[:whole]).tobytes())
        self.pending = bits[whole:].copy()

    def write(self, value: int, n: int) -> None:
        self.write_array(np.array([value], np.int64), n)

    def write_array(self, values: np.ndarray, n: int, chunk: int = 1 << 20) -> None:
        shifts = np.arange(n - 1, -1, -1, dtype=np.int64)
        values = np.asarray(values, np.int64).reshape(-1)
        for at in range(0, len(values), chunk):
            self._add(((values[at:at + chunk, None] >> shifts) & 1).astype(np.uint8).ravel())

    def write_codes(self, symbols: np.ndarray, codes: dict[int, tuple[int, int]], chunk: int = 1 << 20) -> None:
        """Each symbol's code: the codes' bits laid out in one table, gathered by each symbol's offset."""
        if not len(symbols):
            return
        syms = np.array(sorted(codes), np.int64)
        lengths = np.array([codes[int(t)][1] for t in syms], np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        table = np.concatenate([((codes[int(t)][0] >> np.arange(n - 1, -1, -1)) & 1).astype(np.uint8)
                                for t, n in zip(syms, lengths)])
        symbols = np.asarray(symbols, np.int64)
        for at in range(0, len(symbols), chunk):
            which = np.searchsorted(syms, symbols[at:at + chunk])
            if (syms[np.minimum(which, len(syms) - 1)] != symbols[at:at + chunk]).any():
                raise ValueError("a symbol has no Huffman code")
            n = lengths[which]
            ends = np.cumsum(n)
            # bit j of the chunk is bit (j - its symbol's first bit) of that symbol's code
            first = np.repeat(ends - n, n)
            self._add(table[np.repeat(starts[which], n) + np.arange(int(ends[-1])) - first])

    def getvalue(self) -> bytes:
        tail = np.packbits(self.pending).tobytes() if self.pending.size else b""  # zero-padded last byte
        return b"".join(self.packed) + tail


class BitReader:
    def __init__(self, data: bytes) -> None:
        self.bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8)) if data else np.zeros(0, np.uint8)
        self.at = 0

    def read(self, n: int) -> int:
        return int(self.read_array(1, n)[0])

    def read_array(self, count: int, n: int) -> np.ndarray:
        if self.at + count * n > len(self.bits):
            raise ValueError("the file ends inside a field: truncated or not this format")
        bits = self.bits[self.at:self.at + count * n].reshape(count, n).astype(np.int64)
        self.at += count * n
        return (bits << np.arange(n - 1, -1, -1, dtype=np.int64)).sum(axis=1) if n else np.zeros(count, np.int64)

    def read_huffman(self, codes: dict[int, tuple[int, int]], count: int) -> np.ndarray:
        """`count` symbols of a canonical Huffman code, decoded by table: every code is a prefix of the
        window of the longest code's width that starts at it, so one lookup per symbol gives symbol and
        length (a loop over symbols, not over bits)."""
        if not count:
            return np.zeros(0, np.int64)
        width = max(n for _, n in codes.values())
        if width > TABLE_BITS:  # a table of 2**width entries would be too big: walk the codes bit by bit
            return self._read_huffman_bits(codes, count)
        sym_of = np.zeros(1 << width, np.int64)
        len_of = np.zeros(1 << width, np.int64)
        for sym, (code, n) in codes.items():
            lo = code << (width - n)
            sym_of[lo:lo + (1 << (width - n))] = sym
            len_of[lo:lo + (1 << (width - n))] = n
        tail = self.bits[self.at:self.at + count * width]  # the stream is no longer than this
        padded = np.concatenate([tail, np.zeros(width, np.uint8)]).astype(np.int64)
        window = np.zeros(len(tail), np.int64)  # the width-bit integer starting at every bit position
        for j in range(width):
            window = (window << 1) | padded[j:j + len(tail)]
        out = np.empty(count, np.int64)
        at, syms, lens, win = 0, memoryview(sym_of), memoryview(len_of), memoryview(window)
        try:
            for i in range(count):
                w = win[at]
                out[i] = syms[w]
                at += lens[w]
        except IndexError:
            raise ValueError("the file ends inside a Huffman stream: truncated or not this format") from None
        if at > len(tail):
            raise ValueError("the file ends inside a Huffman stream: truncated or not this format")
        self.at += at
        return out

    def _read_huffman_bits(self, codes: dict[int, tuple[int, int]], count: int) -> np.ndarray:
        decode = {c: sym for sym, c in codes.items()}
        bits, at, out = self.bits, self.at, np.empty(count, np.int64)
        for i in range(count):
            code, n = 0, 0
            while (code, n) not in decode:
                if at >= len(bits):
                    raise ValueError("the file ends inside a Huffman stream: truncated or not this format")
                code, n, at = (code << 1) | int(bits[at]), n + 1, at + 1
            out[i] = decode[(code, n)]
        self.at = at
        return out


@dataclass
class Layer:
    """One sparse layer: its shape, the entries' gaps and values (floats, or codebook indices when shared)."""
    shape: tuple[int, ...]
    gap_bits: int
    gaps: list[int]
    values: np.ndarray  # float32 per entry, or int codebook indices per entry (0 = zero)
    codebook: np.ndarray | None = None  # float32 centroids, codebook[0] == 0
    index_bits: int = 0

    @classmethod
    def sparse(cls, weight: np.ndarray, gap_bits: int) -> "Layer":
        flat = weight.reshape(-1).astype(np.float32)
        g, _ = gaps(np.flatnonzero(flat), gap_bits)
        return cls(tuple(weight.shape), gap_bits, g, flat[positions(g)])

    @classmethod
    def shared(cls, index: np.ndarray, codebook: np.ndarray, gap_bits: int, index_bits: int) -> "Layer":
        """A layer whose weight is codebook[index] (index 0: zero)."""
        flat = index.reshape(-1)
        g, _ = gaps(np.flatnonzero(flat), gap_bits)
        return cls(tuple(index.shape), gap_bits, g, flat[positions(g)].astype(np.int64),
                   np.asarray(codebook, np.float32), index_bits)

    def dense(self) -> np.ndarray:
        out = np.zeros(int(np.prod(self.shape)), np.float32)
        vals = self.codebook[self.values] if self.codebook is not None else self.values
        out[positions(self.gaps)] = vals
        return out.reshape(self.shape)


def layer_bits(layer: Layer, huffman: bool = False) -> int:
    """The bits `encode` writes for this layer's weights (not its header): gaps and values, plus the
    codebook, plus the Huffman tables when coded."""
    n = len(layer.gaps)
    if layer.codebook is None:
        gap_part = layer.gap_bits * n if not huffman else _huffman_bits([g - 1 for g in layer.gaps])
        return gap_part + FLOAT_BITS * n
    book = FLOAT_BITS * len(layer.codebook)
    if not huffman:
        return (layer.gap_bits + layer.index_bits) * n + book
    return _huffman_bits([g - 1 for g in layer.gaps]) + _huffman_bits(layer.values.tolist()) + book


def _huffman_bits(symbols: list[int]) -> int:
    """A Huffman-coded stream's bits: its table (a 16-bit symbol count, then a byte each of symbol and
    code length) and its codes."""
    lengths = huffman_lengths(symbols)
    counts = Counter(symbols)
    return 16 + 16 * len(lengths) + sum(counts[s] * n for s, n in lengths.items())


def _write_stream(w: BitWriter, symbols: list[int], bits: int, huffman: bool) -> None:
    if not huffman:
        w.write_array(np.asarray(symbols, np.int64), bits)
        return
    lengths = huffman_lengths(symbols)
    w.write(len(lengths), 16)
    for sym, n in sorted(lengths.items()):
        w.write(sym, 8)
        w.write(n, 8)
    w.write_codes(np.asarray(symbols, np.int64), canonical_codes(lengths))


def _read_stream(r: BitReader, n: int, bits: int, huffman: bool) -> list[int]:
    if not huffman:
        return r.read_array(n, bits).tolist()
    lengths = {}
    for _ in range(r.read(16)):
        sym = r.read(8)
        lengths[sym] = r.read(8)
    return r.read_huffman(canonical_codes(lengths), n).tolist()


def encode_layer(layer: Layer, huffman: bool = False) -> bytes:
    """The layer's weights as `layer_bits` counts them, padded to a whole byte: the codebook (float32),
    then the gap stream, then the values (float32, or codebook indices)."""
    if max(layer.gap_bits, layer.index_bits) > 8:
        raise ValueError("gap and index widths above 8 bits are not supported (Han et al. use at most 8)")
    w = BitWriter()
    if layer.codebook is not None:
        w.write_array(layer.codebook.astype(">f4").view(">u4").astype(np.int64), FLOAT_BITS)
    _write_stream(w, [g - 1 for g in layer.gaps], layer.gap_bits, huffman)
    if layer.codebook is None:
        w.write_array(layer.values.astype(">f4").view(">u4").astype(np.int64), FLOAT_BITS)
    else:
        _write_stream(w, layer.values.tolist(), layer.index_bits, huffman)
    return w.getvalue()


def decode_layer(data: bytes, shape: tuple[int, ...], entries: int, gap_bits: int, index_bits: int = 0,
                 codebook_size: int = 0, huffman: bool = False) -> Layer:
    r = BitReader(data)
    codebook = None
    if codebook_size:
        codebook = r.read_array(codebook_size, FLOAT_BITS).astype(">u4").view(">f4").astype(np.float32)
    gap_list = [g + 1 for g in _read_stream(r, entries, gap_bits, huffman)]
    if codebook is None:
        values = r.read_array(entries, FLOAT_BITS).astype(">u4").view(">f4").astype(np.float32)
    else:
        values = np.array(_read_stream(r, entries, index_bits, huffman), np.int64)
    return Layer(tuple(shape), gap_bits, gap_list, values, codebook, index_bits)


MAGIC = b"RCDC1"
BINARY_MAGIC = b"RCBN1"


def _pack(magic: bytes, head: dict[str, Any], blobs: list[bytes], others: dict[str, np.ndarray]) -> bytes:
    """The one container of every file here: `magic`, a 4-byte header length, a JSON header (`head`,
    with every other tensor appended under "others"), then the payloads in header order, those
    tensors last as raw little-endian bytes."""
    import json

    head["others"] = []
    blobs = list(blobs)
    for name, arr in others.items():
        blob = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()
        head["others"].append({"name": name, "shape": list(arr.shape), "dtype": arr.dtype.str.lstrip("<>|="),
                               "bytes": len(blob)})
        blobs.append(blob)
    header = json.dumps(head, separators=(",", ":")).encode()
    return magic + len(header).to_bytes(4, "little") + header + b"".join(blobs)


def _unpack(data: bytes, magic: bytes, what: str) -> tuple[dict[str, Any], Callable[[int], bytes]]:
    """(the header, `take(n)`: the next n payload bytes) of a `_pack` file."""
    import json

    if data[:len(magic)] != magic:
        raise ValueError(f"not a rescomp {what} file")
    at = len(magic) + 4
    size = int.from_bytes(data[len(magic):at], "little")
    head = json.loads(data[at:at + size])
    pos = [at + size]

    def take(n: int) -> bytes:
        pos[0] += n
        return data[pos[0] - n:pos[0]]

    return head, take


def _unpack_others(head: dict[str, Any], take: Callable[[int], bytes]) -> dict[str, np.ndarray]:
    return {e["name"]: np.frombuffer(take(e["bytes"]), np.dtype("<" + e["dtype"])).reshape(e["shape"]).copy()
            for e in head["others"]}


def encode_model(layers: dict[str, Layer], others: dict[str, np.ndarray], huffman: bool = False) -> bytes:
    """A file holding every coded layer (`encode_layer`) and every other tensor (`_pack`): the header
    gives each layer's name, shape, widths, counts and byte length. `decode_model` reads it back."""
    head, blobs = {"huffman": huffman, "layers": []}, []
    for name, layer in layers.items():
        blob = encode_layer(layer, huffman)
        head["layers"].append({"name": name, "shape": list(layer.shape), "entries": len(layer.gaps),
                               "gap_bits": layer.gap_bits, "index_bits": layer.index_bits,
                               "codebook": 0 if layer.codebook is None else len(layer.codebook), "bytes": len(blob)})
        blobs.append(blob)
    return _pack(MAGIC, head, blobs, others)


def decode_model(data: bytes) -> dict[str, np.ndarray]:
    """Every tensor of an `encode_model` file, dense."""
    head, take = _unpack(data, MAGIC, "Deep Compression")
    out = {e["name"]: decode_layer(take(e["bytes"]), tuple(e["shape"]), e["entries"], e["gap_bits"], e["index_bits"],
                                   e["codebook"], head["huffman"]).dense()
           for e in head["layers"]}
    return {**out, **_unpack_others(head, take)}


def encode_binary(binary: dict[str, tuple[np.ndarray, np.ndarray]], int8: dict[str, tuple[np.ndarray, np.ndarray]],
                  others: dict[str, np.ndarray]) -> bytes:
    """SEP-Net storage: each binarized layer as 1 bit per weight (its sign, packed) and one float32 scale
    per filter; each 8-bit layer as one byte per weight and one float32 scale; every other tensor raw."""
    head, blobs = {"binary": [], "int8": []}, []
    for name, (signs, scales) in binary.items():
        blob = np.packbits(signs.reshape(-1)).tobytes() + scales.astype("<f4").tobytes()
        head["binary"].append({"name": name, "shape": list(signs.shape), "bytes": len(blob)})
        blobs.append(blob)
    for name, (codes, scale) in int8.items():
        blob = codes.astype(np.int8).tobytes() + scale.astype("<f4").tobytes()
        head["int8"].append({"name": name, "shape": list(codes.shape), "bytes": len(blob)})
        blobs.append(blob)
    return _pack(BINARY_MAGIC, head, blobs, others)


def decode_binary(data: bytes) -> dict[str, np.ndarray]:
    """Every tensor of an `encode_binary` file, dense."""
    head, take = _unpack(data, BINARY_MAGIC, "binarized")
    out = {}
    for e in head["binary"]:
        shape, n = tuple(e["shape"]), int(np.prod(e["shape"]))
        blob = take(e["bytes"])
        packed = (n + 7) // 8
        signs = np.unpackbits(np.frombuffer(blob[:packed], np.uint8))[:n].reshape(shape)
        scales = np.frombuffer(blob[packed:], "<f4").reshape((shape[0],) + (1,) * (len(shape) - 1))
        out[e["name"]] = np.where(signs == 1, np.float32(1), np.float32(-1)) * scales
    for e in head["int8"]:
        n = int(np.prod(e["shape"]))
        blob = take(e["bytes"])
        codes = np.frombuffer(blob[:n], np.int8).reshape(e["shape"])
        out[e["name"]] = codes.astype(np.float32) * np.frombuffer(blob[n:n + 4], "<f4")[0]
    return {**out, **_unpack_others(head, take)}


def network(blob: bytes, spec: dict[str, Any]) -> Any:
    """The plain network (no masks, codes or sign patterns) that a Deep Compression or binarized file
    holds, in eval mode: the spec without the keys those techniques add, loaded with the file's tensors."""
    import torch

    from rescomp.models import build_model

    tensors = decode_binary(blob) if blob.startswith(BINARY_MAGIC) else decode_model(blob)
    model = build_model({k: v for k, v in spec.items() if k not in ("masked", "shared", "binarized")})
    model.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()})
    return model.eval()


def stored_form(model: Any, spec: dict[str, Any], gap_bits_conv: int = 8, gap_bits_fc: int = 5) -> Any:
    """How rescomp stores a masked, weight-shared or binarized network, as its stages do: (the plain network
    its file decodes to, {"stored_bytes": the smallest file's bytes, "stored_as": that format}); None for a
    network stored as its tensors. Its costs are the plain network's (the same outputs)."""
    if spec.get("binarized"):
        from rescomp.compress import binarize as bz

        blob = encode_binary(*bz.stored(model))
        return network(blob, spec), {"stored_bytes": len(blob), "stored_as": "binarized"}
    if spec.get("masked") or spec.get("shared"):
        from rescomp.compress import deep_compression as dc

        files = dc.encodings(model, gap_bits_conv, gap_bits_fc)
        best = min(files, key=lambda k: len(files[k]))
        return network(files["dense"], spec), {"stored_bytes": len(files[best]), "stored_as": best}
    return None
