//! Format sniffing and size limits: everything that is decided from the bytes and headers
//! before a single pixel is decoded.

use image::{ImageFormat, Limits};

use super::ImageError;

const SUPPORTED_FORMATS: [ImageFormat; 6] = [
    ImageFormat::Jpeg,
    ImageFormat::Png,
    ImageFormat::WebP,
    ImageFormat::Gif,
    ImageFormat::Bmp,
    ImageFormat::Tiff,
];

/// Extra allocation headroom granted to decoders on top of the pixel buffer (metadata, ICC
/// profiles, line buffers).
const ALLOC_SLACK: u64 = 64 << 20;

/// The format named by the magic bytes, if it is one we decode.
pub(super) fn sniff_format(bytes: &[u8]) -> Result<ImageFormat, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    let format = image::guess_format(bytes).map_err(|_| ImageError::UnsupportedFormat)?;
    if !SUPPORTED_FORMATS.contains(&format) {
        return Err(ImageError::UnsupportedFormat);
    }
    Ok(format)
}

/// Refuses an image whose header announces more than `max_pixels` pixels. Bytes whose size
/// cannot be read this way pass; the decoder's own header check catches them.
pub(super) fn check_header_pixels(bytes: &[u8], max_pixels: u64) -> Result<(), ImageError> {
    // A bare header sniff first: a decoder may want more than the header (PNG reads up to the
    // first IDAT) before it reports dimensions, and a bomb must be refused as too large, not as
    // undecodable.
    if let Ok(size) = imagesize::blob_size(bytes) {
        let (w, h) = (size.width as u64, size.height as u64);
        if w.saturating_mul(h) > max_pixels {
            return Err(ImageError::TooLarge {
                width: w.min(u32::MAX as u64) as u32,
                height: h.min(u32::MAX as u64) as u32,
                max_pixels,
            });
        }
    }
    Ok(())
}

/// Allocation limits for the `image` decoders: 8 bytes (16-bit RGBA) for each of `max_pixels`
/// pixels, plus [`ALLOC_SLACK`].
pub(super) fn decoder_limits(max_pixels: u64) -> Limits {
    let mut limits = Limits::default();
    limits.max_alloc = Some(max_pixels.saturating_mul(8).saturating_add(ALLOC_SLACK));
    limits
}

/// The decoder's dimensions: refused when over `max_pixels` (the limit is inclusive) or empty.
pub(super) fn check_dimensions(width: u32, height: u32, max_pixels: u64) -> Result<(), ImageError> {
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(ImageError::TooLarge {
            width,
            height,
            max_pixels,
        });
    }
    if width == 0 || height == 0 {
        return Err(ImageError::Empty);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use image::ImageFormat;

    use super::super::fixtures::{encode, sample_rgb};
    use super::super::{decode_rgb, preprocess_bytes, ImageError, PreprocessConfig};

    /// CRC-32 (IEEE), for crafting PNG chunks.
    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32(&body).to_be_bytes());
    }

    /// A PNG that announces `w` x `h` RGB pixels but carries a tiny (bogus) IDAT.
    fn bomb_png(w: u32, h: u32) -> Vec<u8> {
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&w.to_be_bytes());
        ihdr.extend_from_slice(&h.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        png_chunk(&mut png, b"IHDR", &ihdr);
        // zlib stream of a few zero bytes: nowhere near enough data for 20000 rows.
        png_chunk(
            &mut png,
            b"IDAT",
            &[0x78, 0x9c, 0x63, 0x60, 0x00, 0x00, 0x00, 0x02, 0x00, 0x01],
        );
        png_chunk(&mut png, b"IEND", &[]);
        png
    }

    #[test]
    fn pixel_limit_refused_before_decoding() {
        let png = bomb_png(20_000, 20_000);
        assert!(png.len() < 300, "crafted PNG is {} bytes", png.len());
        let t = std::time::Instant::now();
        match decode_rgb(&png, 40_000_000) {
            Err(ImageError::TooLarge {
                width: 20_000,
                height: 20_000,
                max_pixels: 40_000_000,
            }) => {}
            other => panic!("expected TooLarge, got {other:?}"),
        }
        assert!(t.elapsed().as_millis() < 500);
        // Under the limit, the same header is decoded and fails on the missing data; the
        // refusal above therefore happened before any pixel was decoded.
        assert!(matches!(
            decode_rgb(&bomb_png(200, 200), 40_000_000),
            Err(ImageError::Decode(_))
        ));
        let cfg = PreprocessConfig::default();
        assert!(matches!(
            preprocess_bytes(&png, &cfg),
            Err(ImageError::TooLarge { .. })
        ));
    }

    #[test]
    fn limit_is_inclusive() {
        let png = encode(&sample_rgb(10, 10), ImageFormat::Png);
        assert!(decode_rgb(&png, 100).is_ok());
        assert!(matches!(
            decode_rgb(&png, 99),
            Err(ImageError::TooLarge { .. })
        ));
    }
}
