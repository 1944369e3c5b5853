//! CLIP image preprocessing in pure Rust, matching OpenAI CLIP's Python pipeline
//! (PIL + torchvision) as closely as possible.
//!
//! Pipeline (see [`preprocess_bytes`]):
//! 1. decode from bytes, format detected from magic bytes (JPEG, PNG, WebP, GIF first frame,
//!    BMP, TIFF), after refusing images whose header announces more than `max_pixels` pixels;
//! 2. apply the EXIF orientation like `PIL.ImageOps.exif_transpose` (EXIF tag 0x0112 in IFD0,
//!    falling back to an XMP `tiff:Orientation` when the EXIF data has no orientation tag);
//! 3. convert to RGB like PIL's `Image.convert("RGB")`: alpha dropped (not composited), grey
//!    replicated, palette expanded. 16-bit data follows what PIL does when it opens 16-bit
//!    files (verified with Pillow 13.0): 16-bit RGB/RGBA/LA PNGs are opened as 8-bit modes by
//!    keeping the HIGH byte of every sample (truncation, not rounding), while 16-bit grey is
//!    opened as mode `I;16`, whose conversion to RGB CLIPS each value to 255 (so a typical
//!    16-bit grey image turns almost white; we reproduce that on purpose). JPEG pixels come
//!    from libjpeg-turbo's decoder, PIL's own (see `jpeg`); CMYK JPEGs are treated as
//!    Adobe-inverted, as PIL does (`CMYK;I` raw mode);
//! 4. resize so that the shorter side is `size` with PIL's bicubic resampling
//!    (`libImaging/Resample.c`: separable, antialiased, 8-bit fixed-point coefficients,
//!    horizontal pass first, each pass clipped to `u8`), with torchvision's `Resize(size)`
//!    output-size rule;
//! 5. center crop `size`x`size` like torchvision's `CenterCrop` (Python banker's rounding);
//! 6. scale to `[0, 1]` and normalize with the CLIP mean/std, CHW `f32`.
//!
//! Parity with PIL (`tests/preprocess_parity.rs`): bit-exact for every format, JPEG included
//! (4:4:4, 4:2:2, 4:2:0, progressive, grey, CMYK).
//!
//! Note: OpenAI's `clip.load` transform converts to RGB *after* resizing and cropping; for RGB
//! and greyscale input the order makes no difference, for RGBA/palette/CMYK/16-bit input it
//! does (PIL resizes RGBA premultiplied and palette images with nearest neighbour). We convert
//! first, which is what the reference script in `scripts/ref_preprocess.py` does too.
//!
//! Layout: `sniff` (format detection, pixel limits), `jpeg` (libjpeg-turbo decoding), `exif`
//! (orientation), `resample` (resize, crop, normalization); this file holds the pipeline.

mod exif;
mod jpeg;
mod resample;
mod sniff;

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, RgbImage};

pub use resample::{center_crop, resize_center_crop, resize_shorter_bicubic, to_chw_normalized};

/// CLIP's per-channel normalization mean (RGB), as in OpenAI's `clip/clip.py`.
pub const CLIP_MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
/// CLIP's per-channel normalization standard deviation (RGB), as in OpenAI's `clip/clip.py`.
#[allow(clippy::excessive_precision)] // keep the literals exactly as written upstream
pub const CLIP_STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];

/// Preprocessing parameters.
#[derive(Clone, Debug)]
pub struct PreprocessConfig {
    /// Output side length (the shorter side is resized to it, then a center crop).
    pub size: u32,
    /// Per-channel mean subtracted after scaling to `[0, 1]`.
    pub mean: [f32; 3],
    /// Per-channel standard deviation divided by after subtracting the mean.
    pub std: [f32; 3],
    /// Images whose header announces more than this many pixels are refused before decoding.
    pub max_pixels: u64,
}

impl Default for PreprocessConfig {
    fn default() -> Self {
        Self {
            size: 224,
            mean: CLIP_MEAN,
            std: CLIP_STD,
            max_pixels: 40_000_000,
        }
    }
}

/// Why an image could not be preprocessed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The header announces more pixels than allowed; nothing was decoded.
    #[error("image is {width}x{height} pixels, more than the limit of {max_pixels} pixels")]
    TooLarge {
        width: u32,
        height: u32,
        max_pixels: u64,
    },
    /// The bytes are not a JPEG, PNG, WebP, GIF, BMP or TIFF image.
    #[error(
        "unsupported or unrecognized image format (expected JPEG, PNG, WebP, GIF, BMP or TIFF)"
    )]
    UnsupportedFormat,
    /// The image is malformed or uses an unsupported feature.
    #[error("cannot decode image: {0}")]
    Decode(String),
    /// No bytes, or an image with zero width or height.
    #[error("empty image")]
    Empty,
}

/// Decodes an image (steps 1-3): detects the format from magic bytes, refuses images with more
/// than `max_pixels` pixels before decoding them, applies the EXIF orientation and converts to
/// 8-bit RGB the way PIL's `convert("RGB")` does. Never panics on malformed input.
pub fn decode_rgb(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, ImageError> {
    let format = sniff::sniff_format(bytes)?;
    // Third-party decoders are not supposed to panic, but a panic on hostile bytes must not
    // take a request handler down with it.
    std::panic::catch_unwind(|| decode_known_format(bytes, format, max_pixels))
        .unwrap_or_else(|_| Err(ImageError::Decode(format!("{format:?} decoder panicked"))))
}

fn decode_known_format(
    bytes: &[u8],
    format: ImageFormat,
    max_pixels: u64,
) -> Result<RgbImage, ImageError> {
    sniff::check_header_pixels(bytes, max_pixels)?;
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    reader.limits(sniff::decoder_limits(max_pixels));
    // Only the headers are parsed here.
    let mut decoder = reader.into_decoder().map_err(decode_error)?;
    let (width, height) = decoder.dimensions();
    sniff::check_dimensions(width, height, max_pixels)?;
    let orientation = exif::exif_orientation(&mut decoder, format);
    let rgb = if format == ImageFormat::Jpeg {
        // Headers and metadata came from the image crate; pixels from libjpeg-turbo, as PIL.
        drop(decoder);
        jpeg::decode_rgb(bytes)?
    } else {
        to_rgb_like_pil(DynamicImage::from_decoder(decoder).map_err(decode_error)?)
    };
    Ok(match orientation {
        Some(o) => exif::transpose_exif(&rgb, o),
        None => rgb,
    })
}

fn decode_error(e: image::ImageError) -> ImageError {
    match e {
        image::ImageError::Unsupported(u) => {
            ImageError::Decode(format!("unsupported image feature: {u}"))
        }
        other => ImageError::Decode(other.to_string()),
    }
}

/// `Image.convert("RGB")` of what PIL would have opened.
fn to_rgb_like_pil(img: DynamicImage) -> RgbImage {
    fn map<const N: usize, T: Copy>(
        w: u32,
        h: u32,
        src: &[T],
        f: impl Fn(&[T]) -> [u8; 3],
    ) -> RgbImage {
        let mut out = Vec::with_capacity(src.len() / N * 3);
        for px in src.chunks_exact(N) {
            out.extend_from_slice(&f(px));
        }
        RgbImage::from_raw(w, h, out).expect("buffer size matches dimensions")
    }
    let (w, h) = (img.width(), img.height());
    let hi = |v: u16| (v >> 8) as u8;
    match img {
        DynamicImage::ImageRgb8(b) => b,
        DynamicImage::ImageRgba8(b) => map::<4, u8>(w, h, b.as_raw(), |p| [p[0], p[1], p[2]]),
        DynamicImage::ImageLuma8(b) => map::<1, u8>(w, h, b.as_raw(), |p| [p[0]; 3]),
        DynamicImage::ImageLumaA8(b) => map::<2, u8>(w, h, b.as_raw(), |p| [p[0]; 3]),
        // PIL opens 16-bit RGB(A) and LA as 8-bit modes keeping the high byte ...
        DynamicImage::ImageRgb16(b) => {
            map::<3, u16>(w, h, b.as_raw(), |p| [hi(p[0]), hi(p[1]), hi(p[2])])
        }
        DynamicImage::ImageRgba16(b) => {
            map::<4, u16>(w, h, b.as_raw(), |p| [hi(p[0]), hi(p[1]), hi(p[2])])
        }
        DynamicImage::ImageLumaA16(b) => map::<2, u16>(w, h, b.as_raw(), |p| [hi(p[0]); 3]),
        // ... but 16-bit grey as "I;16", and I;16 -> RGB clips at 255.
        DynamicImage::ImageLuma16(b) => {
            map::<1, u16>(w, h, b.as_raw(), |p| [p[0].min(255) as u8; 3])
        }
        other => other.to_rgb8(),
    }
}

/// The full CLIP preprocessing (steps 1-6): decode, EXIF orientation, RGB, bicubic resize of
/// the shorter side to `cfg.size`, center crop, normalization. Returns CHW `f32` of length
/// `3 * size * size`.
pub fn preprocess_bytes(bytes: &[u8], cfg: &PreprocessConfig) -> Result<Vec<f32>, ImageError> {
    let img = decode_rgb(bytes, cfg.max_pixels)?;
    let crop = resize_center_crop(&img, cfg.size);
    Ok(to_chw_normalized(&crop, cfg.mean, cfg.std))
}

/// Steps 1-5 and the scaling to `[0, 1]` (no mean/std): the resized, cropped image as CHW
/// `f32`, for comparison with the PIL reference.
pub fn preprocess_unnormalized(
    bytes: &[u8],
    cfg: &PreprocessConfig,
) -> Result<Vec<f32>, ImageError> {
    let img = decode_rgb(bytes, cfg.max_pixels)?;
    let crop = resize_center_crop(&img, cfg.size);
    Ok(to_chw_normalized(&crop, [0.0; 3], [1.0; 3]))
}

/// Test images shared by the unit tests of this module's files.
#[cfg(test)]
mod fixtures {
    use std::io::Cursor;

    use image::{DynamicImage, ImageFormat, RgbImage};

    pub(super) fn sample_rgb(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([
                (x * 7 + y * 3) as u8,
                (x * x + y) as u8,
                (255 - (x * 5 + y * 11) % 256) as u8,
            ])
        })
    }

    pub(super) fn encode(img: &RgbImage, format: ImageFormat) -> Vec<u8> {
        let mut buf = Cursor::new(Vec::new());
        DynamicImage::ImageRgb8(img.clone())
            .write_to(&mut buf, format)
            .unwrap();
        buf.into_inner()
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::{encode, sample_rgb};
    use super::*;

    #[test]
    fn garbage_gives_errors_not_panics() {
        assert!(matches!(decode_rgb(&[], 1000), Err(ImageError::Empty)));
        assert!(matches!(
            decode_rgb(b"hello world, not an image", 1000),
            Err(ImageError::UnsupportedFormat)
        ));
        // Pseudo-random bytes, with and without a valid magic prefix.
        let mut state = 0x1234_5678_9abc_def0u64;
        let mut rand = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let magics: [&[u8]; 7] = [
            b"",
            b"\xff\xd8\xff",
            b"\x89PNG\r\n\x1a\n",
            b"GIF89a",
            b"BM",
            b"II*\0",
            b"RIFF\0\0\0\0WEBPVP8 ",
        ];
        for magic in magics {
            for len in [0usize, 1, 5, 17, 100, 1000] {
                let mut bytes = magic.to_vec();
                bytes.extend((0..len).map(|_| rand() as u8));
                let _ = decode_rgb(&bytes, 1_000_000);
            }
        }
    }

    #[test]
    fn truncated_and_corrupted_files_do_not_panic() {
        let img = sample_rgb(37, 29);
        let mut state = 42u64;
        let mut rand = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) as usize
        };
        for format in [
            ImageFormat::Jpeg,
            ImageFormat::Png,
            ImageFormat::Gif,
            ImageFormat::Bmp,
            ImageFormat::Tiff,
            ImageFormat::WebP,
        ] {
            let bytes = encode(&img, format);
            assert!(decode_rgb(&bytes, 1_000_000).is_ok(), "{format:?}");
            for cut in (0..bytes.len()).step_by((bytes.len() / 97).max(1)) {
                let _ = decode_rgb(&bytes[..cut], 1_000_000);
            }
            for _ in 0..200 {
                let mut b = bytes.clone();
                for _ in 0..1 + rand() % 4 {
                    let i = rand() % b.len();
                    b[i] = rand() as u8;
                }
                let _ = decode_rgb(&b, 1_000_000);
            }
        }
    }

    #[test]
    fn pipeline_output_shapes() {
        let png = encode(&sample_rgb(7, 5), ImageFormat::Png);
        let cfg = PreprocessConfig::default();
        assert_eq!(preprocess_bytes(&png, &cfg).unwrap().len(), 3 * 224 * 224);
        let u = preprocess_unnormalized(&png, &cfg).unwrap();
        assert!(u.iter().all(|&x| (0.0..=1.0).contains(&x)));
    }
}
