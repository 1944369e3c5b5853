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

mod jpeg;

use std::io::Cursor;
use std::ops::Range;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits, RgbImage};

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

/// Decodes an image (steps 1-4): detects the format from magic bytes, refuses images with more
/// than `max_pixels` pixels before decoding them, applies the EXIF orientation and converts to
/// 8-bit RGB the way PIL's `convert("RGB")` does. Never panics on malformed input.
pub fn decode_rgb(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    let format = image::guess_format(bytes).map_err(|_| ImageError::UnsupportedFormat)?;
    if !SUPPORTED_FORMATS.contains(&format) {
        return Err(ImageError::UnsupportedFormat);
    }
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
    let mut limits = Limits::default();
    limits.max_alloc = Some(max_pixels.saturating_mul(8).saturating_add(ALLOC_SLACK));
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    reader.limits(limits);
    // Only the headers are parsed here.
    let mut decoder = reader.into_decoder().map_err(decode_error)?;
    let (width, height) = decoder.dimensions();
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
    let orientation = exif_orientation(&mut decoder, format);
    let rgb = if format == ImageFormat::Jpeg {
        // Headers and metadata came from the image crate; pixels from libjpeg-turbo, as PIL.
        drop(decoder);
        jpeg::decode_rgb(bytes)?
    } else {
        to_rgb_like_pil(DynamicImage::from_decoder(decoder).map_err(decode_error)?)
    };
    Ok(match orientation {
        Some(o) => transpose_exif(&rgb, o),
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

/// The EXIF orientation (2-8) that `ImageOps.exif_transpose` would apply, if any.
fn exif_orientation(decoder: &mut impl ImageDecoder, format: ImageFormat) -> Option<u8> {
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
    let exif = match exif::Reader::new().continue_on_error(true).read_raw(chunk) {
        Ok(exif) => exif,
        Err(e) => match e.distill_partial_result(|_| {}) {
            Ok(exif) => exif,
            Err(_) => return fallback.map(u32::from),
        },
    };
    exif.get_field(exif::Tag::Orientation, exif::In::PRIMARY)
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

/// Applies an EXIF orientation (2-8) with the same transposes as `ImageOps.exif_transpose`.
fn transpose_exif(img: &RgbImage, orientation: u8) -> RgbImage {
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

// ---------------------------------------------------------------------------------------------
// PIL bicubic resampling (libImaging/Resample.c, 8 bits per channel)
// ---------------------------------------------------------------------------------------------

/// Fixed-point precision of PIL's 8-bit resampling coefficients.
const PRECISION_BITS: u32 = 32 - 8 - 2;
const BICUBIC_SUPPORT: f64 = 2.0;

/// PIL's bicubic kernel (a = -0.5).
fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Fixed-point coefficients for a range of output positions along one axis.
struct Coeffs {
    /// Coefficient slots per output position (`ksize` in Resample.c).
    ksize: usize,
    /// Per output position: first input index and number of taps.
    bounds: Vec<(usize, usize)>,
    /// `bounds.len() * ksize` fixed-point weights.
    weights: Vec<i32>,
}

/// `precompute_coeffs` + `normalize_coeffs_8bpc` of Resample.c, for the output positions in
/// `range` only (each position's coefficients depend on nothing but its index).
fn precompute_coeffs(in_size: u64, out_size: u64, range: Range<u64>) -> Coeffs {
    // PIL's box is float: (in1 - in0) is computed in single precision.
    let (in0, in1) = (0.0f32, in_size as f32);
    let scale = f64::from(in1 - in0) / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = BICUBIC_SUPPORT * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let ss = 1.0 / filterscale;
    let n = (range.end - range.start) as usize;
    let mut bounds = Vec::with_capacity(n);
    let mut weights = vec![0i32; n * ksize];
    let mut k = vec![0f64; ksize];
    for (i, xx) in range.enumerate() {
        let center = f64::from(in0) + (xx as f64 + 0.5) * scale;
        // C's (int) cast truncates toward zero, as does `as`.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
        let taps = (xmax - xmin).clamp(0, ksize as i64) as usize;
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(taps) {
            let w = bicubic_filter(((x as i64 + xmin) as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        let row = &mut weights[i * ksize..i * ksize + taps];
        for (dst, &kx) in row.iter_mut().zip(&k[..taps]) {
            let kx = if ww != 0.0 { kx / ww } else { kx };
            let scaled = kx * f64::from(1u32 << PRECISION_BITS);
            *dst = if kx < 0.0 {
                (-0.5 + scaled) as i32
            } else {
                (0.5 + scaled) as i32
            };
        }
        bounds.push((xmin as usize, taps));
    }
    Coeffs {
        ksize,
        bounds,
        weights,
    }
}

/// Resample.c's `clip8`: drop the fraction bits and saturate to `0..=255`.
#[inline]
fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// One horizontal pass over `rows` of `src` (RGB, `src_w` wide); output is `coeffs.bounds.len()`
/// wide and `rows.len()` tall.
fn resample_horizontal(src: &[u8], src_w: usize, rows: Range<usize>, c: &Coeffs) -> Vec<u8> {
    let out_w = c.bounds.len();
    let mut out = Vec::with_capacity(out_w * rows.len() * 3);
    for y in rows {
        let line = &src[y * src_w * 3..(y + 1) * src_w * 3];
        for (xx, &(xmin, taps)) in c.bounds.iter().enumerate() {
            let k = &c.weights[xx * c.ksize..xx * c.ksize + taps];
            let px = &line[xmin * 3..(xmin + taps) * 3];
            let (mut s0, mut s1, mut s2) = (HALF, HALF, HALF);
            for (p, &kx) in px.chunks_exact(3).zip(k) {
                s0 = s0.wrapping_add(i32::from(p[0]).wrapping_mul(kx));
                s1 = s1.wrapping_add(i32::from(p[1]).wrapping_mul(kx));
                s2 = s2.wrapping_add(i32::from(p[2]).wrapping_mul(kx));
            }
            out.extend_from_slice(&[clip8(s0), clip8(s1), clip8(s2)]);
        }
    }
    out
}

/// One vertical pass over `src` (RGB, `w` wide); row indices in `c.bounds` are shifted down by
/// `row_offset` (the first source row held in `src`).
fn resample_vertical(src: &[u8], w: usize, row_offset: usize, c: &Coeffs) -> Vec<u8> {
    let stride = w * 3;
    let mut out = Vec::with_capacity(c.bounds.len() * stride);
    let mut acc = vec![0i32; stride];
    for (yy, &(ymin, taps)) in c.bounds.iter().enumerate() {
        let k = &c.weights[yy * c.ksize..yy * c.ksize + taps];
        acc.fill(HALF);
        for (t, &ky) in k.iter().enumerate() {
            let y = ymin + t - row_offset;
            let line = &src[y * stride..(y + 1) * stride];
            for (a, &p) in acc.iter_mut().zip(line) {
                *a = a.wrapping_add(i32::from(p).wrapping_mul(ky));
            }
        }
        out.extend(acc.iter().map(|&a| clip8(a)));
    }
    out
}

/// Computes the window `x_range` x `y_range` of `img` resized to `out_w` x `out_h` with PIL's
/// bicubic filter, without materializing the rest of the resized image. The result is
/// bit-identical to `img.resize((out_w, out_h), Image.BICUBIC).crop(window)`.
fn resample_window(
    img: &RgbImage,
    out_w: u64,
    out_h: u64,
    x_range: Range<u64>,
    y_range: Range<u64>,
) -> RgbImage {
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    let (win_w, win_h) = (x_range.end - x_range.start, y_range.end - y_range.start);
    if in_w == 0 || in_h == 0 || win_w == 0 || win_h == 0 {
        return RgbImage::new(win_w as u32, win_h as u32);
    }
    let src: &[u8] = img.as_raw();
    let need_horizontal = out_w != in_w as u64;
    let need_vertical = out_h != in_h as u64;

    // Source rows the vertical pass reads (or the identity rows when there is none).
    let vert = need_vertical.then(|| precompute_coeffs(in_h as u64, out_h, y_range.clone()));
    let rows = match &vert {
        Some(c) => {
            let first = c.bounds[0].0;
            let last = c.bounds.iter().map(|&(m, t)| m + t).max().unwrap_or(first);
            first..last.max(first)
        }
        None => y_range.start as usize..y_range.end as usize,
    };

    // Horizontal pass (or a plain column copy when the width does not change).
    let tmp = if need_horizontal {
        let c = precompute_coeffs(in_w as u64, out_w, x_range);
        resample_horizontal(src, in_w, rows.clone(), &c)
    } else {
        let (x0, x1) = (x_range.start as usize * 3, x_range.end as usize * 3);
        let mut v = Vec::with_capacity(rows.len() * (x1 - x0));
        for y in rows.clone() {
            v.extend_from_slice(&src[y * in_w * 3 + x0..y * in_w * 3 + x1]);
        }
        v
    };

    let out = match &vert {
        Some(c) => resample_vertical(&tmp, win_w as usize, rows.start, c),
        None => tmp,
    };
    RgbImage::from_raw(win_w as u32, win_h as u32, out).expect("window buffer size")
}

/// torchvision `Resize(size)` output size for a `w` x `h` image: the shorter side becomes
/// `size`, the longer `int(size * long / short)`.
fn resized_dims(w: u32, h: u32, size: u32) -> (u64, u64) {
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    // size * long is exact in f64 (< 2^53 for any sane size) and IEEE division rounds like
    // Python's int / int.
    let new_long = ((u64::from(size) * u64::from(long)) as f64 / f64::from(short)) as u64;
    if w <= h {
        (u64::from(size), new_long)
    } else {
        (new_long, u64::from(size))
    }
}

/// Python's `int(round(d / 2.0))` for `d >= 0` (round half to even).
fn half_round_even(d: u64) -> u64 {
    let q = d / 2;
    if d % 2 == 1 && q % 2 == 1 {
        q + 1
    } else {
        q
    }
}

/// Resizes so that the shorter side is `size` (torchvision `Resize(size)` on a PIL image:
/// PIL bicubic with antialiasing, exactly as Pillow's `Resample.c` computes it). Images
/// smaller than `size` are upscaled. The whole resized image is materialized, so a very
/// elongated input yields a very large output; [`resize_center_crop`] avoids that.
pub fn resize_shorter_bicubic(img: &image::RgbImage, size: u32) -> image::RgbImage {
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 || size == 0 {
        return RgbImage::new(0, 0);
    }
    let (nw, nh) = resized_dims(w, h, size);
    let (nw, nh) = (nw.min(u64::from(u32::MAX)), nh.min(u64::from(u32::MAX)));
    resample_window(img, nw, nh, 0..nw, 0..nh)
}

/// Center crop `size` x `size` like torchvision's `CenterCrop(size)`:
/// `top = int(round((h - size) / 2.0))` (banker's rounding), same for `left`; an image smaller
/// than `size` along an axis is first zero-padded (torchvision's padding rule).
pub fn center_crop(img: &image::RgbImage, size: u32) -> image::RgbImage {
    let (w, h) = img.dimensions();
    // Per axis: (source offset, destination offset, length).
    let axis = |n: u32| -> (u32, u32, u32) {
        if n >= size {
            (half_round_even(u64::from(n - size)) as u32, 0, size)
        } else {
            (0, (size - n) / 2, n)
        }
    };
    let (sx, dx, lx) = axis(w);
    let (sy, dy, ly) = axis(h);
    let mut out = RgbImage::new(size, size);
    for y in 0..ly {
        for x in 0..lx {
            out.put_pixel(dx + x, dy + y, *img.get_pixel(sx + x, sy + y));
        }
    }
    out
}

/// [`resize_shorter_bicubic`] followed by [`center_crop`], computing only the cropped pixels
/// (bit-identical result, bounded work and memory for any aspect ratio).
pub fn resize_center_crop(img: &image::RgbImage, size: u32) -> image::RgbImage {
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 || size == 0 {
        return RgbImage::new(size, size);
    }
    let (nw, nh) = resized_dims(w, h, size);
    let s = u64::from(size);
    // The shorter side is exactly `size` and the longer one is at least `size`.
    let left = half_round_even(nw - s);
    let top = half_round_even(nh - s);
    resample_window(img, nw, nh, left..left + s, top..top + s)
}

/// Converts to a CHW `f32` tensor: `(v / 255 - mean[c]) / std[c]` (torchvision `ToTensor` +
/// `Normalize`, in `f32` like torch).
pub fn to_chw_normalized(img: &image::RgbImage, mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
    let plane = img.width() as usize * img.height() as usize;
    let mut out = vec![0f32; 3 * plane];
    for (i, px) in img.as_raw().chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * plane + i] = (f32::from(px[c]) / 255.0 - mean[c]) / std[c];
        }
    }
    out
}

/// The full CLIP preprocessing (steps 1-7): decode, EXIF orientation, RGB, bicubic resize of
/// the shorter side to `cfg.size`, center crop, normalization. Returns CHW `f32` of length
/// `3 * size * size`.
pub fn preprocess_bytes(bytes: &[u8], cfg: &PreprocessConfig) -> Result<Vec<f32>, ImageError> {
    let img = decode_rgb(bytes, cfg.max_pixels)?;
    let crop = resize_center_crop(&img, cfg.size);
    Ok(to_chw_normalized(&crop, cfg.mean, cfg.std))
}

/// Steps 1-6 only: the resized, cropped image as CHW `f32` in `[0, 1]` (no mean/std), for
/// comparison with the PIL reference.
pub fn preprocess_unnormalized(
    bytes: &[u8],
    cfg: &PreprocessConfig,
) -> Result<Vec<f32>, ImageError> {
    let img = decode_rgb(bytes, cfg.max_pixels)?;
    let crop = resize_center_crop(&img, cfg.size);
    Ok(to_chw_normalized(&crop, [0.0; 3], [1.0; 3]))
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn sample_rgb(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([
                (x * 7 + y * 3) as u8,
                (x * x + y) as u8,
                (255 - (x * 5 + y * 11) % 256) as u8,
            ])
        })
    }

    fn encode(img: &RgbImage, format: ImageFormat) -> Vec<u8> {
        let mut buf = Cursor::new(Vec::new());
        DynamicImage::ImageRgb8(img.clone())
            .write_to(&mut buf, format)
            .unwrap();
        buf.into_inner()
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
    fn center_crop_uses_bankers_rounding() {
        // (h - 224) / 2: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, 3.5 -> 4.
        for (d, want) in [(0, 0), (1, 0), (2, 1), (3, 2), (5, 2), (7, 4), (76, 38)] {
            assert_eq!(half_round_even(d), want, "d = {d}");
        }
        let img = RgbImage::from_fn(224, 229, |_, y| image::Rgb([y as u8, 0, 0]));
        let c = center_crop(&img, 224);
        assert_eq!(c.dimensions(), (224, 224));
        assert_eq!(c.get_pixel(0, 0)[0], 2); // round(2.5) == 2, not 3
        let img = RgbImage::from_fn(227, 224, |x, _| image::Rgb([x as u8, 0, 0]));
        assert_eq!(center_crop(&img, 224).get_pixel(0, 0)[0], 2); // round(1.5) == 2
                                                                  // Smaller than the crop: zero padding, image placed at (size - n) / 2.
        let c = center_crop(&RgbImage::from_pixel(3, 224, image::Rgb([9, 9, 9])), 8);
        assert_eq!(c.get_pixel(1, 0)[0], 0);
        assert_eq!(c.get_pixel(2, 0)[0], 9);
        assert_eq!(c.get_pixel(4, 0)[0], 9);
        assert_eq!(c.get_pixel(5, 0)[0], 0);
    }

    #[test]
    fn resize_output_sizes_follow_torchvision() {
        assert_eq!(resized_dims(640, 480, 224), (298, 224));
        assert_eq!(resized_dims(480, 640, 224), (224, 298));
        assert_eq!(resized_dims(7, 5, 224), (313, 224));
        assert_eq!(resized_dims(1, 50, 224), (224, 11200));
        assert_eq!(resized_dims(300, 224, 224), (300, 224));
        let r = resize_shorter_bicubic(&sample_rgb(7, 5), 224);
        assert_eq!(r.dimensions(), (313, 224));
    }

    #[test]
    fn fused_resize_crop_equals_resize_then_crop() {
        for (w, h) in [
            (37, 29),
            (300, 224),
            (224, 301),
            (500, 333),
            (1, 9),
            (9, 1),
            (2, 2),
        ] {
            let img = sample_rgb(w, h);
            let full = center_crop(&resize_shorter_bicubic(&img, 24), 24);
            assert_eq!(full, resize_center_crop(&img, 24), "{w}x{h}");
        }
    }

    #[test]
    fn resize_keeps_constant_images_and_identity() {
        let flat = RgbImage::from_pixel(123, 77, image::Rgb([10, 128, 250]));
        let r = resize_shorter_bicubic(&flat, 224);
        assert!(r.pixels().all(|p| p.0 == [10, 128, 250]));
        let img = sample_rgb(300, 224);
        assert_eq!(resize_shorter_bicubic(&img, 224), img);
    }

    #[test]
    fn extreme_aspect_ratios_do_not_explode() {
        let img = RgbImage::from_fn(1, 100_000, |_, y| image::Rgb([(y % 256) as u8, 0, 0]));
        let out = resize_center_crop(&img, 224);
        assert_eq!(out.dimensions(), (224, 224));
        let img = RgbImage::new(1, 1);
        assert_eq!(resize_center_crop(&img, 224).dimensions(), (224, 224));
    }

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

    #[test]
    fn normalization_and_shapes() {
        let img = RgbImage::from_pixel(2, 1, image::Rgb([255, 0, 128]));
        let v = to_chw_normalized(&img, CLIP_MEAN, CLIP_STD);
        assert_eq!(v.len(), 6);
        assert!((v[0] - (1.0 - CLIP_MEAN[0]) / CLIP_STD[0]).abs() < 1e-6);
        assert!((v[2] - (0.0 - CLIP_MEAN[1]) / CLIP_STD[1]).abs() < 1e-6);
        let png = encode(&sample_rgb(7, 5), ImageFormat::Png);
        let cfg = PreprocessConfig::default();
        assert_eq!(preprocess_bytes(&png, &cfg).unwrap().len(), 3 * 224 * 224);
        let u = preprocess_unnormalized(&png, &cfg).unwrap();
        assert!(u.iter().all(|&x| (0.0..=1.0).contains(&x)));
    }
}
