#!/usr/bin/env python3
"""Reference outputs for clipcap's Rust image preprocessing (src/preprocess.rs).

Usage:
    ref_preprocess.py OUT_DIR                 # generate test images + references
    ref_preprocess.py OUT_DIR --images DIR    # references for the existing images in DIR

For every image, writes OUT_DIR/<name>.f32: the CHW float32 (little-endian) tensor of CLIP's
preprocessing steps 1-6 in [0, 1], computed with PIL exactly as OpenAI CLIP's torchvision
transform would (Resize(224, BICUBIC) + CenterCrop(224) + ToTensor), with
ImageOps.exif_transpose and convert("RGB") applied first (our product's order). torchvision is
not needed: its output-size and crop-offset rules are reimplemented below.
OUT_DIR/manifest.json lists {name, path, ref, format, mode, size, jpeg_subsampling,
lossless, note}; `lossless` marks generated files that no lossy decoder touches.
"""

import argparse
import json
import os
import struct
import sys
import zlib

import numpy as np
from PIL import Image, ImageDraw, ImageOps, JpegImagePlugin

SIZE = 224


def reference(path, size=SIZE):
    """PIL: open, exif_transpose, RGB, torchvision Resize(size) + CenterCrop(size), [0,1] CHW."""
    with Image.open(path) as im0:
        fmt, mode, orig_size = im0.format, im0.mode, im0.size
        # JPEG chroma subsampling: 0 = 4:4:4, 1 = 4:2:2, 2 = 4:2:0, -1 = other/none
        sampling = JpegImagePlugin.get_sampling(im0) if fmt == "JPEG" and mode == "RGB" else -1
        im = ImageOps.exif_transpose(im0)
        im = im.convert("RGB")
    w, h = im.size
    # torchvision.transforms.functional._compute_resized_output_size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    # F_pil.resize -> PIL resize (PIL returns a copy when the size is unchanged)
    im = im.resize((new_w, new_h), Image.BICUBIC)
    # torchvision CenterCrop (no padding needed: both sides are >= size)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    im = im.crop((left, top, left + size, top + size))
    # ToTensor: uint8 HWC -> float32 CHW / 255
    arr = np.asarray(im, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
    chw = np.ascontiguousarray(arr.transpose(2, 0, 1))
    return chw, fmt, mode, orig_size, sampling


# --------------------------------------------------------------------------------------------
# Test image synthesis (deterministic)
# --------------------------------------------------------------------------------------------


def natural(w, h, seed):
    """Smooth gradients + sinusoids + shapes + noise: photo-like statistics, not flat colours."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    u, v = x / max(w - 1, 1), y / max(h - 1, 1)
    base = np.stack(
        [
            110 + 90 * u + 30 * np.sin(7 * v + 1.3),
            80 + 100 * v + 25 * np.cos(9 * u * v + 0.4),
            150 - 70 * u * v + 35 * np.sin(13 * (u - v)),
        ],
        axis=-1,
    )
    base += 18 * np.sin(2 * np.pi * (x / 11.0 + y / 17.0))[..., None]
    im = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(im)
    for _ in range(max(3, (w * h) // 6000)):
        x0, y0 = rng.uniform(-0.1 * w, w), rng.uniform(-0.1 * h, h)
        x1, y1 = x0 + rng.uniform(3, 0.4 * w + 3), y0 + rng.uniform(3, 0.4 * h + 3)
        col = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            d.ellipse([x0, y0, x1, y1], fill=col)
        else:
            d.rectangle([x0, y0, x1, y1], fill=col)
        d.line(
            [tuple(rng.uniform(0, [w, h])), tuple(rng.uniform(0, [w, h]))],
            fill=tuple(int(c) for c in rng.integers(0, 256, 3)),
            width=int(rng.integers(1, 4)),
        )
    arr = np.asarray(im).astype(np.float64) + rng.normal(0, 9, (h, w, 3))
    return np.clip(arr, 0, 255).astype(np.uint8)


def g16_tiff(w, h, seed):
    """16-bit grey with values mostly below 255 (PIL's I;16 -> RGB clips at 255)."""
    return (natural(w, h, seed)[..., 0].astype(np.uint16) + 40).astype(np.uint16)


def png_bytes(arr, color_type, bit_depth):
    """Minimal PNG writer (PIL cannot write 16-bit RGB)."""
    h, w = arr.shape[:2]
    dt = ">u2" if bit_depth == 16 else "u1"
    rows = [b"\x00" + np.ascontiguousarray(arr[i]).astype(dt).tobytes() for i in range(h)]

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"".join(rows), 9))
        + chunk(b"IEND", b"")
    )


def exif_with_orientation(o):
    ex = Image.Exif()
    ex[0x0112] = o
    ex[0x010F] = "clipcap-test"  # Make, so the IFD has more than one entry
    return ex.tobytes()


def generate(out):
    """Writes the synthetic test set into `out`; returns [(file name, note, lossless)]."""
    files = []

    def lossless(name):  # JPEG and lossy WebP go through lossy decoders
        return not name.endswith(".jpg") and "lossy" not in name

    def save(name, im, note, **kw):
        im.save(os.path.join(out, name), **kw)
        files.append((name, note, lossless(name)))

    def raw(name, data, note):
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
        files.append((name, note, lossless(name)))

    rgb = Image.fromarray(natural(301, 227, 1))
    save("jpeg_baseline_420.jpg", rgb, "baseline JPEG q90 4:2:0", quality=90)
    save("jpeg_baseline_444.jpg", rgb, "baseline JPEG q95 4:4:4", quality=95, subsampling=0)
    save("jpeg_baseline_422.jpg", rgb, "baseline JPEG q90 4:2:2", quality=90, subsampling=1)
    save("jpeg_progressive.jpg", rgb, "progressive JPEG q85 4:2:0", quality=85, progressive=True)
    save("jpeg_cmyk.jpg", rgb.convert("CMYK"), "CMYK JPEG (Adobe, inverted)", quality=92)
    save("jpeg_gray.jpg", rgb.convert("L"), "greyscale JPEG", quality=90)
    save("png_rgb.png", rgb, "PNG RGB 8-bit")
    save("png_gray.png", rgb.convert("L"), "PNG greyscale 8-bit")
    save("png_la.png", rgb.convert("LA"), "PNG grey+alpha 8-bit")

    rgba = natural(257, 263, 2)
    alpha = np.asarray(Image.fromarray(natural(257, 263, 3)).convert("L"))
    save("png_rgba.png", Image.fromarray(np.dstack([rgba, alpha]), "RGBA"), "PNG RGBA (alpha dropped)")

    deep = natural(233, 241, 4).astype(np.uint16) * 257 + np.random.default_rng(4).integers(
        0, 257, (241, 233, 3), dtype=np.uint16
    )
    raw("png_rgb16.png", png_bytes(deep, 2, 16), "PNG RGB 16-bit (PIL keeps high byte)")
    raw(
        "png_rgba16.png",
        png_bytes(np.dstack([deep, deep[..., :1]]), 6, 16),
        "PNG RGBA 16-bit (PIL keeps high byte)",
    )
    # 16-bit grey: PIL opens it as I;16 and convert("RGB") clips at 255. Use a low range so that
    # the comparison is not trivially all-white.
    g16 = (natural(229, 239, 5)[..., 1].astype(np.uint16) * 2).astype(np.uint16)
    raw("png_gray16.png", png_bytes(g16, 0, 16), "PNG grey 16-bit, values 0..510 (PIL clips to 255)")

    pal = Image.fromarray(natural(245, 251, 6)).quantize(colors=64)
    pal.info["transparency"] = 3
    save("png_palette_trns.png", pal, "PNG palette + tRNS", transparency=3)

    web = Image.fromarray(natural(311, 229, 7))
    save("webp_lossy.webp", web, "WebP lossy q90", quality=90, method=4)
    save("webp_lossless.webp", web, "WebP lossless", lossless=True)

    f1 = Image.fromarray(natural(239, 231, 8)).quantize(colors=255)
    f2 = Image.fromarray(natural(239, 231, 9)).quantize(colors=255)
    save(
        "gif_animated.gif",
        f1,
        "GIF, 2 frames (first used)",
        save_all=True,
        append_images=[f2],
        duration=100,
        loop=0,
    )

    save("gif_transparent.gif", f2, "GIF with a transparent index", transparency=7)
    save("bmp_rgb.bmp", Image.fromarray(natural(263, 229, 10)), "BMP 24-bit")
    save("bmp_palette.bmp", Image.fromarray(natural(263, 229, 22)).quantize(colors=200), "BMP 8-bit palette")
    save("png_1bit.png", Image.fromarray(natural(241, 233, 23)).convert("1"), "PNG 1-bit (dithered)")
    save("tiff_gray16.tif", Image.fromarray(g16_tiff(229, 241, 24)), "TIFF grey 16-bit (PIL clips to 255)")
    save("tiff_cmyk.tif", Image.fromarray(natural(241, 229, 25)).convert("CMYK"), "TIFF CMYK")
    wa = np.dstack([natural(257, 229, 26), np.asarray(Image.fromarray(natural(257, 229, 27)).convert("L"))])
    save("webp_rgba_lossy.webp", Image.fromarray(wa, "RGBA"), "WebP lossy with alpha", quality=85)
    save("jpeg_restart.jpg", rgb, "JPEG with restart markers", quality=90, restart_marker_blocks=7)
    save("tiff_rgb.tif", Image.fromarray(natural(229, 263, 11)), "TIFF RGB uncompressed")
    save("tiff_lzw.tif", Image.fromarray(natural(251, 229, 12)), "TIFF RGB LZW", compression="tiff_lzw")

    orient = Image.fromarray(natural(293, 229, 13))
    for o in range(2, 9):
        exif = exif_with_orientation(o)
        save(f"jpeg_exif_{o}.jpg", orient, f"JPEG EXIF orientation {o}", quality=90, exif=exif)
    save("png_exif_6.png", orient, "PNG eXIf orientation 6", exif=exif_with_orientation(6))
    exif = exif_with_orientation(8)
    save("webp_exif_8.webp", orient, "WebP lossless EXIF orientation 8", lossless=True, exif=exif)
    xmp = (
        b'<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/">'
        b'<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description '
        b'xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF>'
        b'</x:xmpmeta><?xpacket end="w"?>'
    )
    save("jpeg_xmp_6.jpg", orient, "JPEG, XMP-only orientation 6", quality=90, xmp=xmp)

    save("jpeg_wide.jpg", Image.fromarray(natural(1201, 163, 14)), "JPEG very wide 1201x163", quality=90)
    save("png_tall.png", Image.fromarray(natural(131, 907, 15)), "PNG very tall 131x907")
    save("png_tiny_7x5.png", Image.fromarray(natural(7, 5, 16)), "PNG 7x5 (upscaled)")
    save("jpeg_tiny_9x13.jpg", Image.fromarray(natural(9, 13, 17)), "JPEG 9x13 (upscaled)", quality=95)
    save("png_1x50.png", Image.fromarray(natural(1, 50, 18)), "PNG 1x50 (extreme upscale)")
    save("png_300x224.png", Image.fromarray(natural(300, 224, 19)), "PNG short side already 224")
    save("png_225x401.png", Image.fromarray(natural(225, 401, 20)), "PNG odd crop offsets")
    save("jpeg_large.jpg", Image.fromarray(natural(2003, 1501, 21)), "JPEG 2003x1501 q88", quality=88)
    return files


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--images", help="compute references for the images in this directory instead")
    ap.add_argument("--size", type=int, default=SIZE)
    args = ap.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)

    if args.images:
        names = sorted(n for n in os.listdir(args.images) if not n.startswith("."))
        items = [(os.path.join(os.path.abspath(args.images), n), n, "", False) for n in names]
    else:
        out = os.path.abspath(args.out_dir)
        items = [(os.path.join(out, n), n, note, exact) for n, note, exact in generate(out)]

    manifest = []
    for path, name, note, exact in items:
        chw, fmt, mode, size, sampling = reference(path, args.size)
        ref = name + ".f32"
        chw.astype("<f4").tofile(os.path.join(args.out_dir, ref))
        manifest.append(
            {
                "name": name,
                "path": path,
                "ref": ref,
                "format": fmt,
                "mode": mode,
                "size": list(size),
                "jpeg_subsampling": sampling,
                "lossless": exact,
                "note": note,
            }
        )
    with open(os.path.join(args.out_dir, "manifest.json"), "w") as f:
        json.dump({"size": args.size, "images": manifest}, f, indent=1)
    print(f"wrote {len(manifest)} references to {args.out_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
