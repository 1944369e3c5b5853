//! Resize, crop and normalize: Pillow's fixed-point bicubic resampling
//! (`libImaging/Resample.c`, 8 bits per channel) with torchvision's `Resize(size)` and
//! `CenterCrop(size)` geometry, then `ToTensor` + `Normalize`.

use std::ops::Range;

use image::RgbImage;

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

#[cfg(test)]
mod tests {
    use super::super::fixtures::sample_rgb;
    use super::super::{CLIP_MEAN, CLIP_STD};
    use super::*;

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
    fn normalization() {
        let img = RgbImage::from_pixel(2, 1, image::Rgb([255, 0, 128]));
        let v = to_chw_normalized(&img, CLIP_MEAN, CLIP_STD);
        assert_eq!(v.len(), 6);
        assert!((v[0] - (1.0 - CLIP_MEAN[0]) / CLIP_STD[0]).abs() < 1e-6);
        assert!((v[2] - (0.0 - CLIP_MEAN[1]) / CLIP_STD[1]).abs() < 1e-6);
    }
}
