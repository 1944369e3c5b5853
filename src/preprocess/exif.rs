//! EXIF / XMP orientation, read and applied like `PIL.ImageOps.exif_transpose`.

use image::{ImageDecoder, ImageFormat, RgbImage};

/// The EXIF orientation (2-8) that `ImageOps.exif_transpose` would apply, if any.
pub(super) fn exif_orientation(decoder: &mut impl ImageDecoder, format: ImageFormat) -> Option<u8> {
    // PIL: `getexif()` (IFD0 tag 0x0112); if that has no orientation tag at all, a regex
    // `tiff:Orientation(="|>)([0-9])` on the XMP packet. Values outside 2..=8 are ignored.
    let from_exif = if format == ImageFormat::Tiff {
        // A TIFF file is its own EXIF IFD0.
        match decoder.orientation() {
            Ok(o) => Some(u32::from(o.to_exif())),
            Err(_) => None,
        }
        .filter(|&v| v != 1)
    } else {
        match decoder.exif_metadata() {
            Ok(Some(chunk)) => exif_chunk_orientation(chunk),
            _ => None,
        }
    };
    let value = match from_exif {
        Some(v) => Some(v),
        None => match decoder.xmp_metadata() {
            Ok(Some(xmp)) => xmp_orientation(&xmp),
            _ => None,
        },
    };
    let v = u8::try_from(value?).ok()?;
    (2..=8).contains(&v).then_some(v)
}

/// Orientation tag value from a raw EXIF chunk (TIFF header, optionally preceded by `Exif\0\0`).
fn exif_chunk_orientation(mut chunk: Vec<u8>) -> Option<u32> {
    if chunk.starts_with(b"Exif\0\0") {
        chunk.drain(..6);
    }
    let fallback = image::metadata::Orientation::from_exif_chunk(&chunk).map(|o| o.to_exif());
    // `::exif` is the kamadak-exif crate, not this module.
    let exif = match ::exif::Reader::new()
        .continue_on_error(true)
        .read_raw(chunk)
    {
        Ok(exif) => exif,
        Err(e) => match e.distill_partial_result(|_| {}) {
            Ok(exif) => exif,
            Err(_) => return fallback.map(u32::from),
        },
    };
    exif.get_field(::exif::Tag::Orientation, ::exif::In::PRIMARY)
        .and_then(|f| f.value.get_uint(0))
}

/// PIL's XMP fallback: the first `tiff:Orientation="N` or `tiff:Orientation>N` (one digit).
fn xmp_orientation(xmp: &[u8]) -> Option<u32> {
    const KEY: &[u8] = b"tiff:Orientation";
    let mut start = 0;
    while let Some(pos) = find(&xmp[start..], KEY) {
        let rest = &xmp[start + pos + KEY.len()..];
        let digit = match rest {
            [b'=', b'"', d, ..] | [b'>', d, ..] => Some(*d),
            _ => None,
        };
        if let Some(d) = digit.filter(u8::is_ascii_digit) {
            return Some(u32::from(d - b'0'));
        }
        start += pos + 1;
    }
    None
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Applies an EXIF orientation (2-8) with the same transposes as `ImageOps.exif_transpose`.
pub(super) fn transpose_exif(img: &RgbImage, orientation: u8) -> RgbImage {
    let (w, h) = img.dimensions();
    let swap = matches!(orientation, 5..=8);
    let (ow, oh) = if swap { (h, w) } else { (w, h) };
    let mut out = RgbImage::new(ow, oh);
    for y in 0..oh {
        for x in 0..ow {
            let (sx, sy) = match orientation {
                2 => (w - 1 - x, y),         // FLIP_LEFT_RIGHT
                3 => (w - 1 - x, h - 1 - y), // ROTATE_180
                4 => (x, h - 1 - y),         // FLIP_TOP_BOTTOM
                5 => (y, x),                 // TRANSPOSE
                6 => (y, h - 1 - x),         // ROTATE_270 (90 degrees clockwise)
                7 => (w - 1 - y, h - 1 - x), // TRANSVERSE
                8 => (w - 1 - y, x),         // ROTATE_90 (90 degrees counter-clockwise)
                _ => (x, y),
            };
            out.put_pixel(x, y, *img.get_pixel(sx, sy));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exif_transposes_match_pil() {
        // 2x1 image [a b]; check where pixels land for every orientation.
        let img = RgbImage::from_fn(3, 2, |x, y| image::Rgb([(10 * y + x) as u8, 0, 0]));
        let grid = |o: u8| {
            let t = transpose_exif(&img, o);
            let (w, h) = t.dimensions();
            (0..h)
                .map(|y| (0..w).map(|x| t.get_pixel(x, y)[0]).collect::<Vec<_>>())
                .collect::<Vec<_>>()
        };
        // Source:  0  1  2 / 10 11 12
        assert_eq!(grid(2), vec![vec![2, 1, 0], vec![12, 11, 10]]);
        assert_eq!(grid(3), vec![vec![12, 11, 10], vec![2, 1, 0]]);
        assert_eq!(grid(4), vec![vec![10, 11, 12], vec![0, 1, 2]]);
        assert_eq!(grid(5), vec![vec![0, 10], vec![1, 11], vec![2, 12]]);
        assert_eq!(grid(6), vec![vec![10, 0], vec![11, 1], vec![12, 2]]);
        assert_eq!(grid(7), vec![vec![12, 2], vec![11, 1], vec![10, 0]]);
        assert_eq!(grid(8), vec![vec![2, 12], vec![1, 11], vec![0, 10]]);
    }

    #[test]
    fn xmp_orientation_pattern() {
        assert_eq!(xmp_orientation(b"<x tiff:Orientation=\"6\"/>"), Some(6));
        assert_eq!(
            xmp_orientation(b"<tiff:Orientation>8</tiff:Orientation>"),
            Some(8)
        );
        assert_eq!(xmp_orientation(b"tiff:Orientation = 6"), None);
    }
}
