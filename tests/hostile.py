"""Hostile files built in code, a few hundred kilobytes each: for tests/test_ingest_limits.py and
bench/ingest.py. Nothing here imports muse (the bench runs them where torch is not loaded)."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib

MB = 1_000_000
W = "http://schemas.openxmlformats.org/wordprocessingml/2006/main"
CONTENT_TYPES = (
    '<?xml version="1.0"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
    '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
    '<Default Extension="xml" ContentType="application/xml"/><Override PartName="/word/document.xml" '
    'ContentType="application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"/></Types>')
RELS = (
    '<?xml version="1.0"?><Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
    '<Relationship Id="rId1" Target="word/document.xml" Type="http://schemas.openxmlformats.org/'
    'officeDocument/2006/relationships/officeDocument"/></Relationships>')


def nested_html(depth: int = 100_000) -> bytes:
    return ("<html><body>" + "<div>" * depth + "Deep text." + "</div>" * depth + "</body></html>").encode()


def unclosed_tags_html(n: int = 100_000) -> bytes:
    """html.parser (under BeautifulSoup) is quadratic on this: 24 kB took 4 s."""
    return ("<p>Before.</p>" + "<a " * n).encode()


def docx_with_xml(xml_bytes: int) -> bytes:
    """A valid .docx whose word/document.xml is `xml_bytes` of short paragraphs (inflating ~1000:1)."""
    head = f'<?xml version="1.0"?><w:document xmlns:w="{W}"><w:body>'.encode()
    tail = b"</w:body></w:document>"
    para = b"<w:p><w:r><w:t>" + b"A" * 100 + b"</w:t></w:r></w:p>"
    block = para * ((1 << 20) // len(para))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        z.writestr("[Content_Types].xml", CONTENT_TYPES)  # the package parts python-docx needs to open it
        z.writestr("_rels/.rels", RELS)
        with z.open("word/document.xml", "w") as f:
            f.write(head)
            left = max(xml_bytes - len(head) - len(tail), len(para))
            while left > 0:
                n = min(left, len(block)) // len(para) * len(para) or len(para)
                f.write(block[:n])
                left -= n
            f.write(tail)
    return buf.getvalue()


def lying_docx(xml_bytes: int = 300 * MB, declared: int = 100_000) -> bytes:
    """A zip bomb whose local and central headers both claim a small inflated size."""
    data = bytearray(docx_with_xml(xml_bytes))
    info = zipfile.ZipFile(io.BytesIO(bytes(data))).getinfo("word/document.xml")
    struct.pack_into("<I", data, info.header_offset + 22, declared)  # local file header: uncompressed size
    central = data.rfind(b"word/document.xml") - 46  # its central directory entry: 46 bytes, then the name
    assert data[central:central + 4] == b"PK\x01\x02"
    struct.pack_into("<I", data, central + 24, declared)  # central directory: uncompressed size
    return bytes(data)


def pdf(objects: list[bytes]) -> bytes:
    """A PDF of `objects` (1 is the catalog) with a correct cross-reference table."""
    parts, offsets, size = [b"%PDF-1.4\n"], [], 9
    for i, obj in enumerate(objects, 1):
        offsets.append(size)
        parts.append(f"{i} 0 obj\n".encode() + obj + b"\nendobj\n")
        size += len(parts[-1])
    parts.append(f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode())
    parts += [f"{o:010d} 00000 n \n".encode() for o in offsets]
    parts.append(f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{size}\n%%EOF\n".encode())
    return b"".join(parts)


def flate_bomb_pdf(inflated: int = 200 * MB) -> bytes:
    """One page whose content stream inflates to `inflated` bytes of spaces (~1000:1)."""
    z = zlib.compressobj(9)
    parts, left, block = [z.compress(b"BT /F1 12 Tf 72 720 Td (Bomb) Tj ET\n")], inflated, b" " * (1 << 20)
    while left > 0:
        parts.append(z.compress(block[:left]))
        left -= len(block)
    body = b"".join(parts) + z.flush()
    return pdf([b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
                b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 4 0 R >> >> "
                b"/Contents 5 0 R >>",
                b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
                b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(body) + body + b"\nendstream"])


def many_pages_pdf(pages: int = 60_000, count: int | None = None) -> bytes:
    """`pages` pages sharing one content stream; the page tree's /Count says `count` (default: the truth)."""
    content = b"BT /F1 12 Tf 72 720 Td (Page) Tj ET"
    kids = " ".join(f"{5 + i} 0 R" for i in range(pages))
    page = (b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
            b"/Contents 4 0 R >>")
    return pdf([b"<< /Type /Catalog /Pages 2 0 R >>",
                f"<< /Type /Pages /Kids [{kids}] /Count {pages if count is None else count} >>".encode(),
                b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
                b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream"] + [page] * pages)


def slow_html(mb: int = 20) -> bytes:
    """Ordinary markup, just a lot of it: seconds to scan, for the time limit and cancelling."""
    return b"<b>x</b> " * (mb * MB // 9)
