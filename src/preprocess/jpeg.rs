//! JPEG pixels from libjpeg-turbo's decoder, the one PIL uses.
//!
//! Pure-Rust decoders differ from libjpeg-turbo in the IDCT, the chroma upsampling and the
//! YCbCr→RGB rounding (zune-jpeg: up to 4/255 on 4:2:0 files, a quarter of the pixels off by
//! one or more). mozjpeg's vendored copy of libjpeg-turbo's decoder, built from C without SIMD
//! (no assembler needed), gives PIL's pixels exactly: ISLOW IDCT, fancy upsampling, and block
//! smoothing for progressive files, as libjpeg's defaults and PIL's.
//!
//! PIL semantics kept here: grey is replicated; CMYK (and YCCK) files are read as Adobe-inverted
//! CMYK (`CMYK;I`) and converted with PIL's `cmyk2rgb`; a file that ends before its image data
//! does is an error ("image file is truncated"), while libjpeg's other warnings are ignored, as
//! PIL ignores them.

use std::cell::Cell;

use image::RgbImage;
use mozjpeg::{ColorSpace, Decompress};
use mozjpeg_sys::{jpeg_common_struct, jpeg_error_mgr, jpeg_std_error, JWRN_JPEG_EOF};

use super::ImageError;

thread_local! {
    /// Set by `note_warning` when libjpeg ran out of data (it then pads with grey).
    static TRUNCATED: Cell<bool> = const { Cell::new(false) };
}

/// libjpeg's fatal errors unwind (as the mozjpeg crate's own handler does) with the message.
extern "C-unwind" fn exit_with_message(cinfo: &mut jpeg_common_struct) {
    // SAFETY: libjpeg calls this with its live error manager; `format_message` writes at most
    // JMSG_LENGTH_MAX (200) bytes.
    let msg = unsafe {
        let mut buf = [0u8; 200];
        match cinfo.err.as_ref().and_then(|e| e.format_message) {
            Some(format) => {
                format(cinfo, &*(buf.as_mut_ptr() as *const [u8; 80]));
                let end = buf.iter().position(|&c| c == 0).unwrap_or(buf.len());
                String::from_utf8_lossy(&buf[..end]).into_owned()
            }
            None => "libjpeg error".to_string(),
        }
    };
    std::panic::resume_unwind(Box::new(msg));
}

/// Warnings (level -1) are ignored except running out of data.
extern "C-unwind" fn note_warning(cinfo: &mut jpeg_common_struct, level: std::os::raw::c_int) {
    // SAFETY: libjpeg passes its live error manager.
    let code = unsafe { cinfo.err.as_ref().map_or(0, |e| e.msg_code) };
    if level < 0 && code == JWRN_JPEG_EOF as std::os::raw::c_int {
        TRUNCATED.with(|t| t.set(true));
    }
}

fn error_manager() -> jpeg_error_mgr {
    // SAFETY: jpeg_std_error fills in every field of a zeroed manager.
    let mut err: jpeg_error_mgr = unsafe { std::mem::zeroed() };
    unsafe { jpeg_std_error(&mut err) };
    err.error_exit = Some(exit_with_message);
    err.emit_message = Some(note_warning);
    err
}

/// Decodes a JPEG to RGB as PIL's `Image.open(..).convert("RGB")` does (no EXIF rotation).
pub fn decode_rgb(bytes: &[u8]) -> Result<RgbImage, ImageError> {
    TRUNCATED.with(|t| t.set(false));
    let decoded = std::panic::catch_unwind(|| decode_unchecked(bytes)).map_err(|payload| {
        let msg = payload
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_else(|| "JPEG decoder failed".to_string());
        ImageError::Decode(msg)
    })?;
    if TRUNCATED.with(|t| t.get()) {
        return Err(ImageError::Decode("image file is truncated".into()));
    }
    decoded
}

fn decode_unchecked(bytes: &[u8]) -> Result<RgbImage, ImageError> {
    let io_err = |e: std::io::Error| ImageError::Decode(e.to_string());
    let d = Decompress::with_err(error_manager())
        .from_mem(bytes)
        .map_err(io_err)?;
    let (w, h) = (d.width() as u32, d.height() as u32);
    if w == 0 || h == 0 {
        return Err(ImageError::Empty);
    }
    let rgb: Vec<u8> = match d.color_space() {
        ColorSpace::JCS_GRAYSCALE => {
            let mut s = d.grayscale().map_err(io_err)?;
            let grey: Vec<u8> = s.read_scanlines().map_err(io_err)?;
            grey.iter().flat_map(|&v| [v; 3]).collect()
        }
        ColorSpace::JCS_CMYK | ColorSpace::JCS_YCCK => {
            let mut s = d.to_colorspace(ColorSpace::JCS_CMYK).map_err(io_err)?;
            let cmyk: Vec<[u8; 4]> = s.read_scanlines().map_err(io_err)?;
            cmyk.iter().flat_map(|&p| cmyk_inverted_to_rgb(p)).collect()
        }
        _ => {
            let mut s = d.rgb().map_err(io_err)?;
            s.read_scanlines().map_err(io_err)?
        }
    };
    RgbImage::from_raw(w, h, rgb).ok_or_else(|| ImageError::Decode("short JPEG image".into()))
}

/// PIL's `CMYK;I` raw mode (Adobe files store inverted CMYK) followed by its `cmyk2rgb`.
fn cmyk_inverted_to_rgb(raw: [u8; 4]) -> [u8; 3] {
    let [c, m, y, k] = raw.map(|v| 255 - i32::from(v));
    let nk = 255 - k;
    // MULDIV255(a, b) = ((a*b + 128) >> 8 + (a*b + 128)) >> 8, as in libImaging/Convert.c.
    let mul = |a: i32| {
        let t = a * nk + 128;
        ((t >> 8) + t) >> 8
    };
    [c, m, y].map(|v| (nk - mul(v)).clamp(0, 255) as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(img: &RgbImage, quality: u8) -> Vec<u8> {
        let mut out = vec![];
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality)
            .encode_image(img)
            .unwrap();
        out
    }

    #[test]
    fn truncated_files_are_errors_and_garbage_unwinds_into_an_error() {
        let img = RgbImage::from_fn(64, 48, |x, y| {
            image::Rgb([(x * 4) as u8, (y * 5) as u8, 90])
        });
        let jpg = encode(&img, 90);
        let full = decode_rgb(&jpg).unwrap();
        assert_eq!(full.dimensions(), (64, 48));
        let diff = full
            .as_raw()
            .iter()
            .zip(img.as_raw())
            .map(|(a, b)| (*a as i32 - *b as i32).abs())
            .max()
            .unwrap();
        assert!(diff < 20, "decoded far from the source: {diff}");
        let cut = &jpg[..jpg.len() * 2 / 3];
        let e = decode_rgb(cut).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
        // A later good file is not reported as truncated (the flag is per call).
        assert!(decode_rgb(&jpg).is_ok());
        let mut bad = jpg[..4].to_vec();
        bad.extend_from_slice(&[0xFF, 0xC0, 0, 0]);
        let e = decode_rgb(&bad).unwrap_err().to_string();
        assert!(e.starts_with("cannot decode image: "), "{e}");
        // A fatal libjpeg error (12-bit precision in the frame header) unwinds into an error
        // carrying libjpeg's message.
        let mut bad = jpg.clone();
        let sof = bad.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        bad[sof + 4] = 9;
        let e = decode_rgb(&bad).unwrap_err().to_string();
        assert!(e.contains("precision 9"), "{e}");
    }

    #[test]
    fn cmyk_conversion_follows_pil() {
        // Raw (Adobe-inverted) 255 = no ink: white; raw 0 everywhere: full ink: black.
        assert_eq!(cmyk_inverted_to_rgb([255, 255, 255, 255]), [255, 255, 255]);
        assert_eq!(cmyk_inverted_to_rgb([0, 0, 0, 0]), [0, 0, 0]);
        // Only key at half: grey 128; only cyan full: no red.
        assert_eq!(cmyk_inverted_to_rgb([255, 255, 255, 127]), [127, 127, 127]);
        assert_eq!(cmyk_inverted_to_rgb([0, 255, 255, 255]), [0, 255, 255]);
    }
}
