//! Rendering a [`Scene`] to pixels (textured background, antialiased shapes, film grain) and
//! encoding it as PNG or JPEG.

use anyhow::Result;
use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{ExtendedColorType, ImageEncoder, RgbImage};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::scene::{Scene, Shape};

/// Cell size (pixels) of the grain noise.
const GRAIN_CELL: usize = 4;
/// Range of the grain amplitude (gray levels).
const GRAIN_AMP: (f32, f32) = (1.5, 3.5);
/// JPEG quality for the `.jpg` images.
const JPEG_QUALITY: u8 = 92;

/// Shape geometry in object-local coordinates (unrotated, y down).
enum Geometry {
    Circle { r: f32 },
    Square { half: f32 },
    Cross { half_width: f32, half_length: f32 },
    Polygon(Vec<(f32, f32)>),
}

impl Geometry {
    fn new(shape: Shape, r: f32) -> Geometry {
        match shape {
            Shape::Circle => Geometry::Circle { r: 0.86 * r },
            // Corners on the circumscribed circle (minus a hair).
            Shape::Square => Geometry::Square { half: 0.70 * r },
            // Arm corners at distance sqrt(0.95^2 + 0.28^2) ~ 0.99 r.
            Shape::Cross => Geometry::Cross {
                half_width: 0.28 * r,
                half_length: 0.95 * r,
            },
            Shape::Triangle => Geometry::Polygon(
                (0..3)
                    .map(|k| {
                        let a = -std::f32::consts::FRAC_PI_2
                            + k as f32 * 2.0 * std::f32::consts::PI / 3.0;
                        (r * a.cos(), r * a.sin())
                    })
                    .collect(),
            ),
            Shape::Star => Geometry::Polygon(
                (0..10)
                    .map(|k| {
                        let a =
                            -std::f32::consts::FRAC_PI_2 + k as f32 * std::f32::consts::PI / 5.0;
                        let rr = if k % 2 == 0 { r } else { 0.45 * r };
                        (rr * a.cos(), rr * a.sin())
                    })
                    .collect(),
            ),
        }
    }

    /// Signed distance (pixels) from a local point to the shape outline:
    /// negative inside.
    fn distance(&self, x: f32, y: f32) -> f32 {
        fn boxed(x: f32, y: f32, bx: f32, by: f32) -> f32 {
            let (qx, qy) = (x.abs() - bx, y.abs() - by);
            let outside = (qx.max(0.0).powi(2) + qy.max(0.0).powi(2)).sqrt();
            outside + qx.max(qy).min(0.0)
        }
        match self {
            Geometry::Circle { r } => (x * x + y * y).sqrt() - r,
            Geometry::Square { half } => boxed(x, y, *half, *half),
            Geometry::Cross {
                half_width,
                half_length,
            } => boxed(x, y, *half_width, *half_length).min(boxed(x, y, *half_length, *half_width)),
            Geometry::Polygon(v) => {
                let mut inside = false;
                let mut d2 = f32::INFINITY;
                let mut j = v.len() - 1;
                for i in 0..v.len() {
                    let (xi, yi) = v[i];
                    let (xj, yj) = v[j];
                    // Crossing-number test for the sign.
                    if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
                        inside = !inside;
                    }
                    // Distance to the edge segment.
                    let (ex, ey) = (xj - xi, yj - yi);
                    let (wx, wy) = (x - xi, y - yi);
                    let t = ((wx * ex + wy * ey) / (ex * ex + ey * ey)).clamp(0.0, 1.0);
                    let (dx, dy) = (wx - ex * t, wy - ey * t);
                    d2 = d2.min(dx * dx + dy * dy);
                    j = i;
                }
                if inside {
                    -d2.sqrt()
                } else {
                    d2.sqrt()
                }
            }
        }
    }
}

/// Renders a scene; a pure function of the scene.
pub fn render(scene: &Scene) -> RgbImage {
    let (w, h) = (scene.width as usize, scene.height as usize);
    let mut rng = StdRng::seed_from_u64(scene.noise_seed);
    let mut buf = vec![0f32; w * h * 3];

    // Background: base colour + two soft waves + a vertical gradient.
    let tau = 2.0 * std::f32::consts::PI;
    let mut wave = || {
        let freq = rng.random_range(0.004f32..0.025);
        let dir = rng.random_range(0.0..tau);
        (
            tau * freq * dir.cos(),
            tau * freq * dir.sin(),
            rng.random_range(0.0..tau),
        )
    };
    let (k1x, k1y, p1) = wave();
    let (k2x, k2y, p2) = wave();
    let tex_amp = rng.random_range(2.0f32..6.0);
    let grad = rng.random_range(-6.0f32..6.0);
    let base = scene.background_rgb.map(|c| c as f32);
    // sin(kx*x + ky*y + p) = sin(kx*x)*cos(ky*y + p) + cos(kx*x)*sin(ky*y + p)
    let columns: Vec<[f32; 4]> = (0..w)
        .map(|x| {
            let xf = x as f32;
            let (s1, c1) = (k1x * xf).sin_cos();
            let (s2, c2) = (k2x * xf).sin_cos();
            [s1, c1, s2, c2]
        })
        .collect();
    for y in 0..h {
        let yf = y as f32;
        let gy = grad * (yf / h as f32 - 0.5);
        let (s1, c1) = (k1y * yf + p1).sin_cos();
        let (s2, c2) = (k2y * yf + p2).sin_cos();
        let row = &mut buf[y * w * 3..(y + 1) * w * 3];
        for (px, col) in row.chunks_exact_mut(3).zip(&columns) {
            let wave1 = col[0] * c1 + col[1] * s1;
            let wave2 = col[2] * c2 + col[3] * s2;
            let t = tex_amp * 0.5 * (wave1 + wave2) + gy;
            for (v, b) in px.iter_mut().zip(base) {
                *v = b + t;
            }
        }
    }

    // Objects, antialiased, with a soft light from the top left.
    let light = std::f32::consts::FRAC_1_SQRT_2;
    for obj in &scene.objects {
        let geom = Geometry::new(obj.shape, obj.radius);
        let (sin, cos) = obj.rotation.sin_cos();
        let r = obj.radius;
        let x0 = (obj.cx - r - 1.0).floor().max(0.0) as usize;
        let x1 = ((obj.cx + r + 1.0).ceil() as usize).min(w);
        let y0 = (obj.cy - r - 1.0).floor().max(0.0) as usize;
        let y1 = ((obj.cy + r + 1.0).ceil() as usize).min(h);
        let fill = obj.rgb.map(|c| c as f32);
        for py in y0..y1 {
            for px in x0..x1 {
                let dx = px as f32 + 0.5 - obj.cx;
                let dy = py as f32 + 0.5 - obj.cy;
                // Rotate the pixel center into the object frame; the
                // coverage of the pixel is approximated from the signed
                // distance (analytic antialiasing).
                let lx = dx * cos + dy * sin;
                let ly = -dx * sin + dy * cos;
                let a = (0.5 - geom.distance(lx, ly)).clamp(0.0, 1.0);
                if a <= 0.0 {
                    continue;
                }
                let shade = 1.0 - 0.10 * (dx + dy) * light / r;
                let i = (py * w + px) * 3;
                for c in 0..3 {
                    buf[i + c] = buf[i + c] * (1.0 - a) + fill[c] * shade * a;
                }
            }
        }
    }

    // Fine film-like grain: random values on a small grid (GRAIN_CELL px),
    // bilinearly interpolated, added to all channels.  Smoother than i.i.d.
    // pixel noise, so the PNGs stay small.
    let grain_amp = rng.random_range(GRAIN_AMP.0..GRAIN_AMP.1);
    let cell = GRAIN_CELL;
    let (gw, gh) = (w / cell + 2, h / cell + 2);
    let grid: Vec<f32> = (0..gw * gh)
        .map(|_| (rng.random::<u8>() as f32 - 127.5) / 127.5 * grain_amp)
        .collect();
    let inv = 1.0 / cell as f32;
    let mut out = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        let (gy, fy) = (y / cell, (y % cell) as f32 * inv);
        let (r0, r1) = (
            &grid[gy * gw..(gy + 1) * gw],
            &grid[(gy + 1) * gw..(gy + 2) * gw],
        );
        for x in 0..w {
            let (gx, fx) = (x / cell, (x % cell) as f32 * inv);
            let top = r0[gx] + (r0[gx + 1] - r0[gx]) * fx;
            let bottom = r1[gx] + (r1[gx + 1] - r1[gx]) * fx;
            let g = top + (bottom - top) * fy;
            let i = (y * w + x) * 3;
            for v in &buf[i..i + 3] {
                out.push((v + g + 0.5).clamp(0.0, 255.0) as u8);
            }
        }
    }
    RgbImage::from_raw(scene.width, scene.height, out).expect("buffer size matches")
}

/// Renders `scene` and encodes it as JPEG if `file_name` ends in `.jpg`, else as PNG.
pub(super) fn encode(scene: &Scene, file_name: &str) -> Result<Vec<u8>> {
    let img = render(scene);
    let mut bytes = Vec::new();
    if file_name.ends_with(".jpg") {
        JpegEncoder::new_with_quality(&mut bytes, JPEG_QUALITY).write_image(
            img.as_raw(),
            img.width(),
            img.height(),
            ExtendedColorType::Rgb8,
        )?;
    } else {
        PngEncoder::new_with_quality(&mut bytes, CompressionType::Level(3), FilterType::Adaptive)
            .write_image(
            img.as_raw(),
            img.width(),
            img.height(),
            ExtendedColorType::Rgb8,
        )?;
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::super::scene::random_scenes;
    use super::*;

    #[test]
    fn rendered_pixels_outside_crop_are_background() {
        for scene in random_scenes(40, 9) {
            let img = render(&scene);
            assert_eq!((img.width(), img.height()), (scene.width, scene.height));
            let bg = scene.background_rgb;
            let (x0, y0, s) = (scene.crop_x, scene.crop_y, scene.crop_size);
            for (x, y, p) in img.enumerate_pixels() {
                let inside = x >= x0 && x < x0 + s && y >= y0 && y < y0 + s;
                if !inside {
                    for c in 0..3 {
                        let d = (p[c] as i32 - bg[c] as i32).abs();
                        assert!(d <= 16, "pixel ({x},{y}) {p:?} vs bg {bg:?}");
                    }
                }
            }
            // Each object's center pixel has (roughly) its colour.
            for o in &scene.objects {
                // Stars and triangles are solid at the center; so are the rest.
                let p = img.get_pixel(o.cx as u32, o.cy as u32);
                for c in 0..3 {
                    let d = (p[c] as i32 - o.rgb[c] as i32).abs();
                    assert!(d <= 24, "object {o:?} center {p:?}");
                }
            }
        }
    }
}
