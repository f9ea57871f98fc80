"""A stored WebM cut down to one clip, so that DALI's CPU decoder starts decoding at the keyframe before the clip.

DALI 2.4's CPU video decoder (`fn.decoders.video` on the CPU) keeps no frame index: the operator reads its
`build_index` argument but creates its `FramesDecoderCpu` without it (`CreateDecoder` in DALI's
dali/operators/video/decoder/video_decoder_base.h), that decoder builds none, and without one
`FramesDecoderBase::SeekFrame` (frames_decoder_base.cc) decodes every frame from the first one up to `start_frame`.
The keyframe the shards carry every `prep.keyframe_interval` frames goes unused, and a clip costs more the later it
starts: on a 250-frame video, one at frame 232 cost 10x (RGB) and 8x (flow) one at frame 0 (BENCHMARKS.md).

`clip_stream` hands DALI a smaller stream: the stored file's header, then the blocks from the last keyframe at or
before the clip's start through the clip's last frame, each cluster of them with its own timestamp element and a new
size. A VP9 keyframe decodes without anything before it, so the frames are those the whole stream gives. It reads
the layout dataprep writes (one video track of unlaced SimpleBlocks in clusters of known size) and answers None for
any other, for which the caller hands DALI the whole stream as before; a damaged stream then fails in DALI as before.
"""

from __future__ import annotations

from itertools import groupby
from typing import NamedTuple

import numpy as np

EBML, SEGMENT, SEEK_HEAD, CUES, CLUSTER = 0x1A45DFA3, 0x18538067, 0x114D9B74, 0x1C53BB6B, 0x1F43B675
TIMESTAMP, SIMPLE_BLOCK, BLOCK_GROUP, VOID = 0xE7, 0xA3, 0xA0, 0xEC
KEYFRAME, LACING = 0x80, 0x06  # SimpleBlock flag bits


class _Unexpected(ValueError):
    """A layout `clip_stream` does not cut."""


def _number(data: bytes, at: int) -> tuple[int, int]:
    """The EBML variable-length number at `at`, its length marker kept (an element id), and its length in bytes."""
    length = 9 - data[at].bit_length()
    if length > 8 or at + length > len(data):
        raise _Unexpected(f"no EBML number at byte {at}")
    return int.from_bytes(data[at:at + length], "big"), length


def _element(data: bytes, at: int) -> tuple[int, int, int, int]:
    """The element at `at`: (id, where its size field starts, where its payload starts, where it ends)."""
    element_id, id_length = _number(data, at)
    size, size_length = _number(data, at + id_length)
    size &= (1 << (7 * size_length)) - 1  # the length marker off
    if size == (1 << (7 * size_length)) - 1:
        raise _Unexpected(f"an element of unknown size at byte {at}")
    payload = at + id_length + size_length
    if payload + size > len(data):
        raise _Unexpected(f"the element at byte {at} runs past the end")
    return element_id, at + id_length, payload, payload + size


def _void(length: int) -> bytes:
    """A Void element of `length` bytes, to stand where one was whose byte offsets the cut stream no longer holds."""
    if length < 9:
        return bytes([VOID, 0x80 | (length - 2)]) + bytes(length - 2)
    return bytes([VOID, 0x01]) + (length - 9).to_bytes(7, "big") + bytes(length - 9)


def _size_field(value: int, length: int) -> bytes:
    if value >= (1 << (7 * length)) - 1:
        raise _Unexpected(f"{value} does not fit a {length}-byte size")
    return (value | (1 << (7 * length))).to_bytes(length, "big")


class _Block(NamedTuple):
    cluster: int  # which of the clusters read
    begin: int  # where its element starts and ends in the file
    end: int
    keyframe: bool


def _cut(data: bytes, start: int, last: int) -> tuple[bytes, int]:
    element_id, _, _, end = _element(data, 0)
    if element_id != EBML:
        raise _Unexpected("no EBML header")
    element_id, segment_size_at, segment_payload, _ = _element(data, end)
    if element_id != SEGMENT:
        raise _Unexpected("no segment after the EBML header")
    header, voided, timestamps, blocks, track = None, [], [], [], None  # blocks: one a frame, in order
    at = segment_payload
    while at < len(data) and len(blocks) <= last:  # the top-level elements, as far as the clip's last frame
        element_id, _, payload, end = _element(data, at)
        if element_id == CLUSTER:
            header = data[:at] if header is None else header
            timestamp, child = None, payload
            while child < end:
                child_id, _, child_payload, child_end = _element(data, child)
                if child_id == TIMESTAMP and timestamp is None:
                    timestamp = data[child:child_end]  # its blocks' times are relative to it
                    timestamps.append(timestamp)
                elif child_id in (SIMPLE_BLOCK, BLOCK_GROUP):
                    if timestamp is None:
                        raise _Unexpected(f"a block before its cluster's timestamp at byte {child}")
                    keyframe = False  # a BlockGroup is never cut at
                    if child_id == SIMPLE_BLOCK:
                        block_track, track_length = _number(data, child_payload)
                        flags = data[child_payload + track_length + 2]
                        if flags & LACING or track not in (None, block_track):
                            raise _Unexpected(f"a laced block, or a second track, at byte {child}")
                        track, keyframe = block_track, bool(flags & KEYFRAME)
                    blocks.append(_Block(len(timestamps) - 1, child, child_end, keyframe))
                child = child_end
        elif header is None and element_id in (SEEK_HEAD, CUES):
            voided.append((at, end))  # they hold byte offsets into the whole file
        at = end
    if len(blocks) <= last:
        raise _Unexpected(f"frame {last} asked for, {len(blocks)} found")
    first = next((frame for frame in range(start, -1, -1) if blocks[frame].keyframe), None)
    if first is None:
        raise _Unexpected(f"no keyframe at or before frame {start}")
    header = bytearray(header)
    for begin, end in voided:
        header[begin:end] = _void(end - begin)
    parts = [header]
    for cluster, group in groupby(blocks[first:last + 1], key=lambda block: block.cluster):
        group = list(group)
        body = data[group[0].begin:group[-1].end]
        parts += [CLUSTER.to_bytes(4, "big"), _size_field(len(timestamps[cluster]) + len(body), 8),
                  timestamps[cluster], body]
    stream = bytearray(b"".join(parts))
    stream[segment_size_at:segment_payload] = _size_field(len(stream) - segment_payload,
                                                          segment_payload - segment_size_at)
    return bytes(stream), start - first


def clip_stream(blob, start: int, last: int) -> tuple[np.ndarray, int] | None:
    """What DALI decodes frames `start`..`last` of `blob` (a stored WebM) from: (a cut stream as uint8, the
    frame of `start` in it), or None when `blob` is not laid out as this module expects (decode the whole of it)."""
    try:
        stream, start = _cut(bytes(blob), start, last)
    except (_Unexpected, IndexError):
        return None
    return np.frombuffer(stream, dtype=np.uint8), start
