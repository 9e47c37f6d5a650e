"""Check that an instance's pixel data is what its image pixel attributes describe.

The engine copies pixel data without decoding it, so nothing else at intake would
notice pixel data of the wrong size: it would be taken in and fail later — in the
vetter's burned-in text check, in the viewer, in training. Native pixel data must
hold Rows × Columns × Samples per Pixel × Number of Frames cells of Bits Allocated
(4:2:2 YBR: two samples a pixel); a shorter value cannot be decoded. A longer one
is taken (readers drop the excess; real files carry padding). An encapsulated
transfer syntax needs encapsulated (undefined-length) pixel data and a native one
a defined length. Pixel data with no Rows, Columns or Bits Allocated at all is not
described, so there is nothing to check it against.
"""

from __future__ import annotations

from typing import Final

from node.deid import dicomio as io
from node.deid.dicomio import DicomFormatError, Element, Encoding

ROWS: Final = 0x00280010
COLUMNS: Final = 0x00280011
SAMPLES_PER_PIXEL: Final = 0x00280002
NUMBER_OF_FRAMES: Final = 0x00280008
BITS_ALLOCATED: Final = 0x00280100
PHOTOMETRIC: Final = 0x00280004
NATIVE_SYNTAXES: Final = frozenset(
    {io.IMPLICIT_VR_LE, io.EXPLICIT_VR_LE, io.DEFLATED_LE, io.EXPLICIT_VR_BE}
)
BITS: Final = frozenset({1, 8, 16, 32, 64})


def check_pixels(
    buf: bytes | memoryview, elements: list[Element], enc: Encoding, transfer_syntax: str
) -> None:
    """Raise :class:`DicomFormatError` (``pixel_data_size``) when the top-level pixel data
    does not fit its description; an instance without pixel data passes."""
    found = {el.tag: el for el in elements if el.tag in _WANTED}
    pixels = found.get(io.PIXEL_DATA)
    if pixels is None:
        return
    native = transfer_syntax in NATIVE_SYNTAXES
    if native and pixels.undefined:
        raise DicomFormatError(
            "pixel_data_size",
            f"pixel data is encapsulated but transfer syntax {transfer_syntax} is native",
        )
    if not native:
        if not pixels.undefined:
            raise DicomFormatError(
                "pixel_data_size",
                f"transfer syntax {transfer_syntax} needs encapsulated pixel data; "
                f"it holds {pixels.vend - pixels.vstart} bytes of native pixel data",
            )
        return
    if not {ROWS, COLUMNS, BITS_ALLOCATED} <= found.keys():
        return
    rows = _us(buf, found.get(ROWS), enc, "Rows")
    columns = _us(buf, found.get(COLUMNS), enc, "Columns")
    bits = _us(buf, found.get(BITS_ALLOCATED), enc, "Bits Allocated")
    samples = _us(buf, found.get(SAMPLES_PER_PIXEL), enc, "Samples per Pixel", default=1)
    frames = _frames(buf, found.get(NUMBER_OF_FRAMES))
    if bits not in BITS:
        raise DicomFormatError("pixel_data_size", f"Bits Allocated is {bits}")
    photometric = found.get(PHOTOMETRIC)
    if photometric is not None and bytes(buf[photometric.vstart : photometric.vend]).strip(
        b" \x00"
    ) in (b"YBR_FULL_422", b"YBR_PARTIAL_422"):
        samples = min(samples, 2)  # chroma subsampled: Cb and Cr shared by two pixels
    cells = rows * columns * samples * frames
    expected = (cells * bits + 7) // 8
    held = pixels.vend - pixels.vstart
    if held < expected:
        raise DicomFormatError(
            "pixel_data_size",
            f"pixel data holds {held} bytes; {rows} rows × {columns} columns × {samples} "
            f"sample(s) × {frames} frame(s) of {bits} bits need {expected}",
        )


_WANTED: Final = frozenset(
    {io.PIXEL_DATA, ROWS, COLUMNS, SAMPLES_PER_PIXEL, NUMBER_OF_FRAMES, BITS_ALLOCATED, PHOTOMETRIC}
)


def _us(
    buf: bytes | memoryview, el: Element | None, enc: Encoding, name: str, default: int = -1
) -> int:
    if el is None:
        if default >= 0:
            return default
        raise DicomFormatError("pixel_data_size", f"pixel data without {name}")
    if el.vend - el.vstart != 2:
        raise DicomFormatError("pixel_data_size", f"{name} is not one 16-bit value")
    return int(io.packing(enc).u16.unpack_from(buf, el.vstart)[0])


def _frames(buf: bytes | memoryview, el: Element | None) -> int:
    if el is None:
        return 1
    text = bytes(buf[el.vstart : el.vend]).strip(b" \x00")
    if not text:
        return 1
    if not text.isdigit() or len(text) > 9:
        raise DicomFormatError("pixel_data_size", f"Number of Frames is not a count: {text[:16]!r}")
    return max(1, int(text))
