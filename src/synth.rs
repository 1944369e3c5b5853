//! Deterministic synthetic image-captioning dataset ("synth").
//!
//! Every image shows 1 to 3 flat, antialiased shapes (circle, square,
//! triangle, star, cross) in one of six colours on a white, gray or black,
//! lightly textured and noisy background.  Each image comes with five short
//! captions that are true for the scene and mostly determined by it, so the
//! whole pipeline (feature extraction, ClipCap training, BLEU/CIDEr
//! evaluation) can be exercised without downloads.
//!
//! Image sizes vary independently between 160 and 480 px per side (landscape,
//! portrait and square), but every object lies strictly inside the central
//! `min(w, h)` square, i.e. the region a CLIP-style "resize shorter side,
//! center crop" keeps, so the captions stay true after preprocessing.  Words
//! like "left", "top", "above" refer to that square (and equally to the full
//! image, whose center it shares).
//!
//! Output layout of [`generate`] in `out`:
//! - `images/synth_NNNNNN.png` (every 5th image, index % 5 == 4, is a `.jpg`)
//! - `annotations/captions_synth.json`: COCO caption format; `file_name` is
//!   relative to `images/`
//! - `dataset_coco.json`: Karpathy-split format (`filepath` = `"images"`),
//!   ~80/10/10 train/val/test
//! - `scenes.jsonl`: one JSON object per image with the scene parameters
//!
//! Generation is a pure function of [`SynthConfig`]: the same seed gives
//! byte-identical files (for the pinned `rand`/`image` versions).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::{anyhow, Context, Result};
use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{ExtendedColorType, ImageEncoder, RgbImage};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Smallest image side in pixels.
pub const MIN_SIDE: u32 = 160;
/// Largest image side in pixels.
pub const MAX_SIDE: u32 = 480;
/// Number of captions per image.
pub const CAPTIONS_PER_IMAGE: usize = 5;

/// Object radius (fraction of the crop square side) for small objects.
const SMALL_RADIUS: f32 = 0.08;
/// Object radius (fraction of the crop square side) for large objects.
const LARGE_RADIUS: f32 = 0.14;
/// Relative jitter of the object radius.
const RADIUS_JITTER: f32 = 0.04;
/// Cell size (pixels) of the grain noise.
const GRAIN_CELL: usize = 4;
/// Range of the grain amplitude (gray levels).
const GRAIN_AMP: (f32, f32) = (1.5, 3.5);
/// JPEG quality for the `.jpg` images.
const JPEG_QUALITY: u8 = 92;

/// Generation parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SynthConfig {
    /// Number of images to generate.
    pub images: usize,
    /// Seed of the pseudo-random generator.
    pub seed: u64,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            images: 1000,
            seed: 0,
        }
    }
}

/// What [`generate`] wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SynthSummary {
    /// Number of images written.
    pub images: usize,
    /// Number of captions written (5 per image).
    pub captions: usize,
    /// Images per split: always has the keys `train`, `val` and `test`.
    pub splits: BTreeMap<String, usize>,
}

/// Shape of an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    Circle,
    Square,
    Triangle,
    Star,
    Cross,
}

impl Shape {
    pub const ALL: [Shape; 5] = [
        Shape::Circle,
        Shape::Square,
        Shape::Triangle,
        Shape::Star,
        Shape::Cross,
    ];

    /// Singular noun.
    pub fn word(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Star => "star",
            Shape::Cross => "cross",
        }
    }

    /// Plural noun.
    pub fn plural(self) -> &'static str {
        match self {
            Shape::Circle => "circles",
            Shape::Square => "squares",
            Shape::Triangle => "triangles",
            Shape::Star => "stars",
            Shape::Cross => "crosses",
        }
    }
}

/// Colour of an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Color {
    Red,
    Green,
    Blue,
    Yellow,
    Purple,
    Orange,
}

impl Color {
    pub const ALL: [Color; 6] = [
        Color::Red,
        Color::Green,
        Color::Blue,
        Color::Yellow,
        Color::Purple,
        Color::Orange,
    ];

    pub fn word(self) -> &'static str {
        match self {
            Color::Red => "red",
            Color::Green => "green",
            Color::Blue => "blue",
            Color::Yellow => "yellow",
            Color::Purple => "purple",
            Color::Orange => "orange",
        }
    }

    /// Indefinite article to use before the colour word.
    pub fn article(self) -> &'static str {
        match self {
            Color::Orange => "an",
            _ => "a",
        }
    }

    /// Nominal sRGB value (before per-object jitter).
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Color::Red => [220, 30, 35],
            Color::Green => [30, 165, 60],
            Color::Blue => [35, 75, 225],
            Color::Yellow => [245, 210, 20],
            Color::Purple => [135, 45, 180],
            Color::Orange => [250, 130, 15],
        }
    }
}

/// Background of the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Background {
    White,
    Gray,
    Black,
}

impl Background {
    pub const ALL: [Background; 3] = [Background::White, Background::Gray, Background::Black];

    pub fn word(self) -> &'static str {
        match self {
            Background::White => "white",
            Background::Gray => "gray",
            Background::Black => "black",
        }
    }

    /// Range of the base gray level.
    fn level_range(self) -> (u8, u8) {
        match self {
            Background::White => (236, 248),
            Background::Gray => (118, 138),
            Background::Black => (10, 26),
        }
    }
}

/// Size class of an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Size {
    Small,
    Large,
}

impl Size {
    pub fn word(self) -> &'static str {
        match self {
            Size::Small => "small",
            Size::Large => "large",
        }
    }

    fn radius_fraction(self) -> f32 {
        match self {
            Size::Small => SMALL_RADIUS,
            Size::Large => LARGE_RADIUS,
        }
    }
}

/// Position of a single object inside the crop square.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Position {
    Center,
    Left,
    Right,
    Top,
    Bottom,
}

impl Position {
    pub const ALL: [Position; 5] = [
        Position::Center,
        Position::Left,
        Position::Right,
        Position::Top,
        Position::Bottom,
    ];

    /// Nominal center in crop-square coordinates (0..1).
    fn anchor(self) -> (f32, f32) {
        match self {
            Position::Center => (0.5, 0.5),
            Position::Left => (0.25, 0.5),
            Position::Right => (0.75, 0.5),
            Position::Top => (0.5, 0.25),
            Position::Bottom => (0.5, 0.75),
        }
    }

    fn long_phrase(self) -> &'static str {
        match self {
            Position::Center => "in the center of the image",
            Position::Left => "on the left side of the image",
            Position::Right => "on the right side of the image",
            Position::Top => "at the top of the image",
            Position::Bottom => "at the bottom of the image",
        }
    }

    fn short_phrase(self) -> &'static str {
        match self {
            Position::Center => "in the center",
            Position::Left => "on the left",
            Position::Right => "on the right",
            Position::Top => "at the top",
            Position::Bottom => "at the bottom",
        }
    }
}

/// Arrangement of the objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// One object at the given position.
    Single(Position),
    /// 2 or 3 objects side by side, listed left to right.
    Row,
    /// 2 or 3 objects one above the other, listed top to bottom.
    Column,
}

/// One shape in a scene. Coordinates are pixels of the full image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SceneObject {
    pub shape: Shape,
    pub color: Color,
    pub size: Size,
    /// Center x (pixels).
    pub cx: f32,
    /// Center y (pixels).
    pub cy: f32,
    /// Radius of the circumscribed circle (pixels): the shape lies within it.
    pub radius: f32,
    /// Rotation in radians (0 for circles).
    pub rotation: f32,
    /// Actual fill colour (the nominal colour with a little jitter).
    pub rgb: [u8; 3],
}

/// Everything needed to render an image and write its captions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scene {
    pub width: u32,
    pub height: u32,
    /// Left edge of the central square (pixels).
    pub crop_x: u32,
    /// Top edge of the central square (pixels).
    pub crop_y: u32,
    /// Side of the central square: `min(width, height)`.
    pub crop_size: u32,
    pub background: Background,
    /// Actual base background colour.
    pub background_rgb: [u8; 3],
    pub layout: Layout,
    /// Objects in reading order (left to right for rows, top to bottom for
    /// columns).
    pub objects: Vec<SceneObject>,
    /// Seed of the caption template choices.
    pub caption_seed: u64,
    /// Seed of the texture and pixel noise.
    pub noise_seed: u64,
}

fn pick<T: Copy>(rng: &mut StdRng, items: &[T]) -> T {
    items[rng.random_range(0..items.len())]
}

fn jitter_channel(rng: &mut StdRng, v: u8, amount: i32) -> u8 {
    (v as i32 + rng.random_range(-amount..=amount)).clamp(0, 255) as u8
}

/// Draws a random scene.
pub fn random_scene(rng: &mut StdRng) -> Scene {
    let width = rng.random_range(MIN_SIDE..=MAX_SIDE);
    let height = rng.random_range(MIN_SIDE..=MAX_SIDE);
    let side = width.min(height);
    let crop_x = (width - side) / 2;
    let crop_y = (height - side) / 2;
    let s = side as f32;

    let background = pick(rng, &Background::ALL);
    let (lo, hi) = background.level_range();
    let level = rng.random_range(lo..=hi);
    let background_rgb = [
        jitter_channel(rng, level, 3),
        jitter_channel(rng, level, 3),
        jitter_channel(rng, level, 3),
    ];

    let count = match rng.random_range(0..100) {
        0..40 => 1,
        40..75 => 2,
        _ => 3,
    };
    // Object centers in crop-square coordinates (0..1).
    let (layout, anchors): (Layout, Vec<(f32, f32)>) = if count == 1 {
        let p = if rng.random_bool(0.3) {
            Position::Center
        } else {
            pick(rng, &Position::ALL[1..])
        };
        let (x, y) = p.anchor();
        let (jx, jy) = (
            rng.random_range(-0.04..=0.04),
            rng.random_range(-0.04..=0.04),
        );
        (Layout::Single(p), vec![(x + jx, y + jy)])
    } else {
        let along: &[f32] = if count == 2 {
            &[0.28, 0.72]
        } else {
            &[0.19, 0.5, 0.81]
        };
        let (j_along, j_across) = if count == 2 {
            (0.03, 0.06)
        } else {
            (0.008, 0.05)
        };
        let row = rng.random_bool(0.6);
        let anchors = along
            .iter()
            .map(|&a| {
                let a = a + rng.random_range(-j_along..=j_along);
                let c = 0.5 + rng.random_range(-j_across..=j_across);
                if row {
                    (a, c)
                } else {
                    (c, a)
                }
            })
            .collect();
        (if row { Layout::Row } else { Layout::Column }, anchors)
    };
    // Multi-object scenes: sometimes all objects are the same kind
    // ("two red circles"), otherwise each is drawn independently.
    let clones = count > 1 && rng.random_bool(0.35);
    let base_shape = pick(rng, &Shape::ALL);
    let base_color = pick(rng, &Color::ALL);

    let objects = anchors
        .into_iter()
        .map(|(fx, fy)| {
            let (shape, color) = if clones {
                (base_shape, base_color)
            } else {
                (pick(rng, &Shape::ALL), pick(rng, &Color::ALL))
            };
            let size = if rng.random_bool(0.5) {
                Size::Small
            } else {
                Size::Large
            };
            let radius = s
                * size.radius_fraction()
                * (1.0 + rng.random_range(-RADIUS_JITTER..=RADIUS_JITTER));
            let rotation = match shape {
                Shape::Circle => 0.0,
                _ => rng.random_range(-0.2f32..=0.2),
            };
            let nominal = color.rgb();
            let rgb = [
                jitter_channel(rng, nominal[0], 12),
                jitter_channel(rng, nominal[1], 12),
                jitter_channel(rng, nominal[2], 12),
            ];
            SceneObject {
                shape,
                color,
                size,
                cx: crop_x as f32 + fx * s,
                cy: crop_y as f32 + fy * s,
                radius,
                rotation,
                rgb,
            }
        })
        .collect();

    Scene {
        width,
        height,
        crop_x,
        crop_y,
        crop_size: side,
        background,
        background_rgb,
        layout,
        objects,
        caption_seed: rng.random(),
        noise_seed: rng.random(),
    }
}

// ---------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// Captions
// ---------------------------------------------------------------------------

fn number_word(n: usize) -> &'static str {
    match n {
        1 => "one",
        2 => "two",
        3 => "three",
        _ => "several",
    }
}

/// "a red circle" / "an orange star".
fn object_phrase(color: Color, shape: Shape) -> String {
    format!("{} {} {}", color.article(), color.word(), shape.word())
}

/// "a red circle" / "two red circles".
fn group_phrase(color: Color, shape: Shape, count: usize) -> String {
    if count == 1 {
        object_phrase(color, shape)
    } else {
        format!("{} {} {}", number_word(count), color.word(), shape.plural())
    }
}

/// "A", "A and B", "A, B and C".
fn join_list(items: &[String]) -> String {
    match items.len() {
        0 => String::new(),
        1 => items[0].clone(),
        n => format!("{} and {}", items[..n - 1].join(", "), items[n - 1]),
    }
}

/// Objects grouped by (colour, shape) in order of first appearance.
fn groups(scene: &Scene) -> Vec<(Color, Shape, usize)> {
    let mut out: Vec<(Color, Shape, usize)> = Vec::new();
    for o in &scene.objects {
        match out
            .iter_mut()
            .find(|(c, s, _)| *c == o.color && *s == o.shape)
        {
            Some(g) => g.2 += 1,
            None => out.push((o.color, o.shape, 1)),
        }
    }
    out
}

/// Picks an index according to integer weights.
fn weighted(rng: &mut StdRng, weights: &[u32]) -> usize {
    let total: u32 = weights.iter().sum();
    let mut x = rng.random_range(0..total);
    for (i, &w) in weights.iter().enumerate() {
        if x < w {
            return i;
        }
        x -= w;
    }
    weights.len() - 1
}

/// The five captions of a scene (deterministic given the scene).
///
/// The first one is always the canonical "<objects> on a <bg> background.";
/// the others vary the template (position, count, relation, ...).
pub fn scene_captions(scene: &Scene) -> Vec<String> {
    let mut rng = StdRng::seed_from_u64(scene.caption_seed);
    let bg = scene.background.word();
    let caps = match (scene.objects.as_slice(), scene.layout) {
        ([], _) => vec![format!("an empty {bg} image."); CAPTIONS_PER_IMAGE],
        ([o], layout) => {
            let pos = match layout {
                Layout::Single(p) => p,
                _ => Position::Center,
            };
            single_captions(&mut rng, o, pos, bg)
        }
        _ => multi_captions(&mut rng, scene, bg),
    };
    caps.into_iter().map(|c| format!("{c}.")).collect()
}

fn single_captions(rng: &mut StdRng, o: &SceneObject, pos: Position, bg: &str) -> Vec<String> {
    let (c, sh) = (o.color.word(), o.shape.word());
    let np = object_phrase(o.color, o.shape);
    let np_sized = format!("a {} {c} {sh}", o.size.word());
    let (long, short) = (pos.long_phrase(), pos.short_phrase());
    vec![
        format!("{np_sized} on a {bg} background"),
        match weighted(rng, &[6, 4]) {
            0 => format!("{np} {long}"),
            _ => format!("{np_sized} {short}"),
        },
        match weighted(rng, &[5, 3, 2]) {
            0 => format!("there is one {c} {sh}"),
            1 => format!("there is {np_sized} in the image"),
            _ => format!("one {c} {sh} on a {bg} background"),
        },
        match weighted(rng, &[5, 3, 2]) {
            0 => format!("an image of {np} on a {bg} background"),
            1 => format!("a picture of {np_sized}"),
            _ => format!("a {bg} image with {np} {short}"),
        },
        match weighted(rng, &[4, 3, 3]) {
            0 => format!("{np_sized} against a {bg} background"),
            1 => format!("a {bg} background with {np_sized}"),
            _ => format!("a plain {bg} background with {np}"),
        },
    ]
}

fn multi_captions(rng: &mut StdRng, scene: &Scene, bg: &str) -> Vec<String> {
    let objs = &scene.objects;
    let n = objs.len();
    let nw = number_word(n);
    let row = scene.layout != Layout::Column;
    let gs = groups(scene);
    let list = join_list(
        &gs.iter()
            .map(|&(c, s, k)| group_phrase(c, s, k))
            .collect::<Vec<_>>(),
    );
    let ob: Vec<String> = objs
        .iter()
        .map(|o| object_phrase(o.color, o.shape))
        .collect();
    let kind = |o: &SceneObject| (o.color, o.shape);

    let relation = if gs.len() == 1 {
        let (c, s, _) = gs[0];
        let (c, pl) = (c.word(), s.plural());
        match (n, row) {
            (2, true) => format!("two {c} {pl} side by side"),
            (2, false) => format!("two {c} {pl}, one above the other"),
            (_, true) => format!("{nw} {c} {pl} in a row"),
            (_, false) => format!("{nw} {c} {pl} in a column"),
        }
    } else if n == 3 && kind(&objs[0]) == kind(&objs[2]) {
        format!(
            "{} between two {} {}",
            ob[1],
            objs[0].color.word(),
            objs[0].shape.plural()
        )
    } else if n == 3 && gs.len() == 3 {
        if rng.random_bool(0.5) {
            let order = if row {
                "from left to right"
            } else {
                "from top to bottom"
            };
            format!("{}, {} and {} {order}", ob[0], ob[1], ob[2])
        } else {
            format!("{} between {} and {}", ob[1], ob[0], ob[2])
        }
    } else {
        // Two parts: two objects, or a pair of equal neighbours and a third.
        let (first, second) = if n == 2 {
            (ob[0].clone(), ob[1].clone())
        } else if kind(&objs[0]) == kind(&objs[1]) {
            (group_phrase(objs[0].color, objs[0].shape, 2), ob[2].clone())
        } else {
            (ob[0].clone(), group_phrase(objs[1].color, objs[1].shape, 2))
        };
        match (row, rng.random_bool(0.5)) {
            (true, true) => format!("{first} to the left of {second}"),
            (true, false) => format!("{second} to the right of {first}"),
            (false, true) => format!("{first} above {second}"),
            (false, false) => format!("{second} below {first}"),
        }
    };

    let arrangement = if row { "in a row" } else { "in a column" };
    let count = match weighted(rng, &[4, 2, 2]) {
        0 if gs.len() == 1 || gs[0].2 > 1 => format!("there are {list}"),
        0 => format!("{nw} shapes: {list}"),
        1 => format!("there are {nw} shapes on a {bg} background"),
        _ => format!("{nw} shapes {arrangement} on a {bg} background"),
    };

    vec![
        format!("{list} on a {bg} background"),
        relation,
        count,
        match weighted(rng, &[5, 3, 2]) {
            0 => format!("an image of {list}"),
            1 => format!("a picture with {list}"),
            _ => format!("a {bg} image with {list}"),
        },
        match weighted(rng, &[5, 5]) {
            0 => format!("{list} against a {bg} background"),
            _ => format!("a {bg} background with {list}"),
        },
    ]
}

/// Karpathy-style tokens: lower-cased words without punctuation.
pub fn tokenize(caption: &str) -> Vec<String> {
    caption
        .to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

// ---------------------------------------------------------------------------
// Dataset files
// ---------------------------------------------------------------------------

/// File name of image `index` (every 5th image is a JPEG).
pub fn image_file_name(index: usize) -> String {
    let ext = if index % 5 == 4 { "jpg" } else { "png" };
    format!("synth_{index:06}.{ext}")
}

/// Deterministic ~80/10/10 split.
fn assign_splits(n: usize, rng: &mut StdRng) -> Vec<&'static str> {
    let held = if n >= 3 {
        ((n as f64 * 0.1).round() as usize).max(1)
    } else {
        0
    };
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(rng);
    let mut splits = vec!["train"; n];
    for (k, &i) in order.iter().enumerate() {
        if k < held {
            splits[i] = "test";
        } else if k < 2 * held {
            splits[i] = "val";
        }
    }
    splits
}

fn encode(scene: &Scene, file_name: &str) -> Result<Vec<u8>> {
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

/// Writes `bytes` to a temporary sibling and renames it over `path`.
fn write_atomic(path: &Path, bytes: &[u8], sync: bool) -> Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| anyhow!("no file name in {}", path.display()))?
        .to_string_lossy();
    let tmp: PathBuf = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| -> Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        if sync {
            f.sync_all()?;
        }
        drop(f);
        fs::rename(&tmp, path)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}

/// Renders and writes all images, in parallel; the output does not depend on
/// the number of threads.
fn write_images(dir: &Path, scenes: &[Scene], names: &[String]) -> Result<()> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 16)
        .min(scenes.len().max(1));
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let error: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= scenes.len() || failed.load(Ordering::Relaxed) {
                    break;
                }
                let r = encode(&scenes[i], &names[i])
                    .and_then(|bytes| write_atomic(&dir.join(&names[i]), &bytes, false))
                    .with_context(|| format!("image {}", names[i]));
                if let Err(e) = r {
                    failed.store(true, Ordering::Relaxed);
                    error
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_or_insert(e);
                    break;
                }
            });
        }
    });
    match error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[derive(Serialize)]
struct CocoInfo {
    description: &'static str,
    version: &'static str,
    contributor: &'static str,
    seed: u64,
    images_dir: &'static str,
}

#[derive(Serialize)]
struct CocoImage<'a> {
    id: usize,
    file_name: &'a str,
    width: u32,
    height: u32,
}

#[derive(Serialize)]
struct CocoAnnotation<'a> {
    id: usize,
    image_id: usize,
    caption: &'a str,
}

#[derive(Serialize)]
struct CocoCaptions<'a> {
    info: CocoInfo,
    licenses: Vec<()>,
    #[serde(rename = "type")]
    kind: &'static str,
    images: Vec<CocoImage<'a>>,
    annotations: Vec<CocoAnnotation<'a>>,
}

#[derive(Serialize)]
struct KarpathySentence<'a> {
    tokens: Vec<String>,
    raw: &'a str,
    imgid: usize,
    sentid: usize,
}

#[derive(Serialize)]
struct KarpathyImage<'a> {
    filepath: &'static str,
    filename: &'a str,
    imgid: usize,
    cocoid: usize,
    split: &'static str,
    sentids: Vec<usize>,
    sentences: Vec<KarpathySentence<'a>>,
}

#[derive(Serialize)]
struct KarpathyDataset<'a> {
    dataset: &'static str,
    images: Vec<KarpathyImage<'a>>,
}

#[derive(Serialize)]
struct SceneLine<'a> {
    image_id: usize,
    file_name: &'a str,
    split: &'static str,
    #[serde(flatten)]
    scene: &'a Scene,
}

/// Generates the dataset into `out` (created if missing). Existing files with
/// the same names are replaced.
pub fn generate(out: &Path, cfg: &SynthConfig) -> Result<SynthSummary> {
    let images_dir = out.join("images");
    let ann_dir = out.join("annotations");
    for d in [&images_dir, &ann_dir] {
        fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }

    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let scenes: Vec<Scene> = (0..cfg.images).map(|_| random_scene(&mut rng)).collect();
    let splits = assign_splits(cfg.images, &mut rng);
    let names: Vec<String> = (0..cfg.images).map(image_file_name).collect();
    let captions: Vec<Vec<String>> = scenes.iter().map(scene_captions).collect();

    write_images(&images_dir, &scenes, &names)?;

    // COCO captions.
    let coco = CocoCaptions {
        info: CocoInfo {
            description: "clipcap synthetic shapes captioning dataset",
            version: "1.0",
            contributor: "clipcap synth",
            seed: cfg.seed,
            images_dir: "images",
        },
        licenses: Vec::new(),
        kind: "captions",
        images: scenes
            .iter()
            .enumerate()
            .map(|(i, s)| CocoImage {
                id: i,
                file_name: &names[i],
                width: s.width,
                height: s.height,
            })
            .collect(),
        annotations: captions
            .iter()
            .enumerate()
            .flat_map(|(i, caps)| {
                caps.iter().enumerate().map(move |(k, c)| CocoAnnotation {
                    id: i * CAPTIONS_PER_IMAGE + k,
                    image_id: i,
                    caption: c,
                })
            })
            .collect(),
    };
    write_atomic(
        &ann_dir.join("captions_synth.json"),
        &serde_json::to_vec(&coco)?,
        true,
    )?;

    // Karpathy split file.
    let karpathy = KarpathyDataset {
        dataset: "synth",
        images: captions
            .iter()
            .enumerate()
            .map(|(i, caps)| {
                let sentids: Vec<usize> = (0..caps.len())
                    .map(|k| i * CAPTIONS_PER_IMAGE + k)
                    .collect();
                KarpathyImage {
                    filepath: "images",
                    filename: &names[i],
                    imgid: i,
                    cocoid: i,
                    split: splits[i],
                    sentences: caps
                        .iter()
                        .zip(&sentids)
                        .map(|(c, &sentid)| KarpathySentence {
                            tokens: tokenize(c),
                            raw: c,
                            imgid: i,
                            sentid,
                        })
                        .collect(),
                    sentids,
                }
            })
            .collect(),
    };
    write_atomic(
        &out.join("dataset_coco.json"),
        &serde_json::to_vec(&karpathy)?,
        true,
    )?;

    // Scene dump.
    let mut lines = Vec::new();
    for (i, scene) in scenes.iter().enumerate() {
        serde_json::to_writer(
            &mut lines,
            &SceneLine {
                image_id: i,
                file_name: &names[i],
                split: splits[i],
                scene,
            },
        )?;
        lines.push(b'\n');
    }
    write_atomic(&out.join("scenes.jsonl"), &lines, true)?;

    let mut split_counts: BTreeMap<String, usize> = ["train", "val", "test"]
        .iter()
        .map(|s| (s.to_string(), 0))
        .collect();
    for s in &splits {
        *split_counts.entry(s.to_string()).or_default() += 1;
    }
    Ok(SynthSummary {
        images: cfg.images,
        captions: captions.iter().map(Vec::len).sum(),
        splits: split_counts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// A fresh, empty temporary directory (removed by the caller).
    fn temp_dir(tag: &str) -> PathBuf {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let k = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("clipcap-synth-{tag}-{}-{k}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn scenes(n: usize, seed: u64) -> Vec<Scene> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n).map(|_| random_scene(&mut rng)).collect()
    }

    fn read_tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
        let mut out = BTreeMap::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    let rel = p.strip_prefix(dir).unwrap().to_string_lossy().to_string();
                    out.insert(rel, fs::read(&p).unwrap());
                }
            }
        }
        out
    }

    #[test]
    fn deterministic_output() {
        let cfg = SynthConfig {
            images: 12,
            seed: 7,
        };
        let (a, b) = (temp_dir("a"), temp_dir("b"));
        let sa = generate(&a, &cfg).unwrap();
        let sb = generate(&b, &cfg).unwrap();
        assert_eq!(sa, sb);
        let (ta, tb) = (read_tree(&a), read_tree(&b));
        // 12 images + 3 JSON files, no temporary leftovers.
        assert_eq!(ta.len(), 15, "{:?}", ta.keys().collect::<Vec<_>>());
        assert!(ta.keys().all(|k| !k.contains(".tmp")));
        assert_eq!(ta, tb);

        let c = temp_dir("c");
        generate(
            &c,
            &SynthConfig {
                images: 12,
                seed: 8,
            },
        )
        .unwrap();
        assert_ne!(ta, read_tree(&c));
        for d in [a, b, c] {
            fs::remove_dir_all(d).unwrap();
        }
    }

    #[test]
    fn files_are_consistent() {
        let cfg = SynthConfig {
            images: 20,
            seed: 3,
        };
        let dir = temp_dir("files");
        let summary = generate(&dir, &cfg).unwrap();
        assert_eq!(summary.images, 20);
        assert_eq!(summary.captions, 100);
        assert_eq!(summary.splits.values().sum::<usize>(), 20);
        assert_eq!(summary.splits["test"], 2);
        assert_eq!(summary.splits["val"], 2);
        assert_eq!(summary.splits["train"], 16);

        let coco: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.join("annotations/captions_synth.json")).unwrap())
                .unwrap();
        let images = coco["images"].as_array().unwrap();
        assert_eq!(images.len(), 20);
        assert_eq!(coco["annotations"].as_array().unwrap().len(), 100);
        for im in images {
            let path = dir.join("images").join(im["file_name"].as_str().unwrap());
            let decoded = image::open(&path).unwrap();
            assert_eq!(decoded.width() as u64, im["width"].as_u64().unwrap());
            assert_eq!(decoded.height() as u64, im["height"].as_u64().unwrap());
        }
        assert!(images
            .iter()
            .any(|im| im["file_name"].as_str().unwrap().ends_with(".jpg")));

        let karpathy: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.join("dataset_coco.json")).unwrap()).unwrap();
        assert_eq!(karpathy["dataset"], "synth");
        let kimgs = karpathy["images"].as_array().unwrap();
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        let mut sentids = BTreeSet::new();
        for im in kimgs {
            *counts
                .entry(im["split"].as_str().unwrap().to_string())
                .or_default() += 1;
            let sents = im["sentences"].as_array().unwrap();
            assert_eq!(sents.len(), CAPTIONS_PER_IMAGE);
            assert_eq!(im["sentids"].as_array().unwrap().len(), CAPTIONS_PER_IMAGE);
            for s in sents {
                assert_eq!(s["imgid"], im["imgid"]);
                assert!(sentids.insert(s["sentid"].as_u64().unwrap()));
                let toks: Vec<&str> = s["tokens"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| t.as_str().unwrap())
                    .collect();
                assert!(toks.iter().all(|t| t
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())));
                assert_eq!(tokenize(s["raw"].as_str().unwrap()), toks);
            }
            assert!(dir
                .join(im["filepath"].as_str().unwrap())
                .join(im["filename"].as_str().unwrap())
                .is_file());
        }
        assert_eq!(counts, summary.splits);

        let lines = fs::read_to_string(dir.join("scenes.jsonl")).unwrap();
        assert_eq!(lines.lines().count(), 20);
        for line in lines.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert!(!v["objects"].as_array().unwrap().is_empty());
        }
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn splits_sum_up() {
        for n in [0usize, 1, 2, 3, 10, 99, 1000] {
            let mut rng = StdRng::seed_from_u64(n as u64);
            let s = assign_splits(n, &mut rng);
            assert_eq!(s.len(), n);
            let test = s.iter().filter(|&&x| x == "test").count();
            let val = s.iter().filter(|&&x| x == "val").count();
            let train = s.iter().filter(|&&x| x == "train").count();
            assert_eq!(test + val + train, n);
            if n >= 3 {
                assert!(test >= 1 && val >= 1 && train >= 1);
            }
            if n == 1000 {
                assert_eq!((train, val, test), (800, 100, 100));
            }
        }
    }

    #[test]
    fn captions_match_scene() {
        let colors: Vec<&str> = Color::ALL.iter().map(|c| c.word()).collect();
        let shapes: Vec<Shape> = Shape::ALL.to_vec();
        for scene in scenes(2000, 11) {
            let caps = scene_captions(&scene);
            assert_eq!(caps.len(), CAPTIONS_PER_IMAGE);
            let scene_colors: BTreeSet<&str> =
                scene.objects.iter().map(|o| o.color.word()).collect();
            let scene_shapes: BTreeSet<Shape> = scene.objects.iter().map(|o| o.shape).collect();
            for cap in &caps {
                assert!(cap.ends_with('.'), "{cap}");
                let toks = tokenize(cap);
                assert!(
                    (5..=14).contains(&toks.len()),
                    "{} words: {cap}",
                    toks.len()
                );
                // No colour or shape that is not in the scene.
                for t in &toks {
                    if colors.contains(&t.as_str()) {
                        assert!(scene_colors.contains(t.as_str()), "{cap} vs {scene:?}");
                    }
                    for s in &shapes {
                        if t == s.word() || t == s.plural() {
                            assert!(scene_shapes.contains(s), "{cap} vs {scene:?}");
                        }
                    }
                }
                // The background word, if any, is the right one.
                for b in Background::ALL {
                    if toks.iter().any(|t| t == b.word()) {
                        assert_eq!(b, scene.background, "{cap}");
                    }
                }
            }
            // The canonical caption names every object and the background.
            let first = tokenize(&caps[0]);
            for o in &scene.objects {
                assert!(first.iter().any(|t| t == o.color.word()), "{}", caps[0]);
                assert!(
                    first
                        .iter()
                        .any(|t| t == o.shape.word() || t == o.shape.plural()),
                    "{}",
                    caps[0]
                );
            }
            assert!(first.iter().any(|t| t == scene.background.word()));
            // Counts: "two"/"three" before a plural only for real groups.
            for g in groups(&scene) {
                if g.2 > 1 {
                    let phrase = format!("{} {} {}", number_word(g.2), g.0.word(), g.1.plural());
                    assert!(caps[0].contains(&phrase), "{} / {phrase}", caps[0]);
                }
            }
            // Single objects: size and position words are right.
            if let ([o], Layout::Single(p)) = (scene.objects.as_slice(), scene.layout) {
                assert!(first.iter().any(|t| t == o.size.word()));
                let other = match o.size {
                    Size::Small => "large",
                    Size::Large => "small",
                };
                assert!(caps.iter().all(|c| !tokenize(c).iter().any(|t| t == other)));
                let fx = (o.cx - scene.crop_x as f32) / scene.crop_size as f32;
                let fy = (o.cy - scene.crop_y as f32) / scene.crop_size as f32;
                match p {
                    Position::Left => assert!(fx < 0.35),
                    Position::Right => assert!(fx > 0.65),
                    Position::Top => assert!(fy < 0.35),
                    Position::Bottom => assert!(fy > 0.65),
                    Position::Center => {
                        assert!((fx - 0.5).abs() < 0.1 && (fy - 0.5).abs() < 0.1)
                    }
                }
            }
        }
    }

    #[test]
    fn spatial_relations_are_true() {
        let mut checked = 0;
        for scene in scenes(2000, 13) {
            let objs = &scene.objects;
            if objs.len() != 2 || (objs[0].color, objs[0].shape) == (objs[1].color, objs[1].shape) {
                continue;
            }
            // objs are in reading order, so objs[0] is left of / above objs[1].
            let (a, b) = (
                object_phrase(objs[0].color, objs[0].shape),
                object_phrase(objs[1].color, objs[1].shape),
            );
            let rel = &scene_captions(&scene)[1];
            let expected = match scene.layout {
                Layout::Row => [
                    format!("{a} to the left of {b}."),
                    format!("{b} to the right of {a}."),
                ],
                Layout::Column => [format!("{a} above {b}."), format!("{b} below {a}.")],
                Layout::Single(_) => unreachable!(),
            };
            assert!(expected.contains(rel), "{rel} vs {expected:?}");
            match scene.layout {
                Layout::Row => assert!(objs[0].cx < objs[1].cx),
                _ => assert!(objs[0].cy < objs[1].cy),
            }
            checked += 1;
        }
        assert!(checked > 300);
    }

    #[test]
    fn captions_are_deterministic_and_varied() {
        let all = scenes(300, 5);
        let mut distinct = BTreeSet::new();
        let mut vocab = BTreeSet::new();
        for s in &all {
            let caps = scene_captions(s);
            assert_eq!(caps, scene_captions(s));
            for c in &caps {
                distinct.insert(c.clone());
                vocab.extend(tokenize(c));
            }
        }
        assert!(distinct.len() > 600);
        assert!(vocab.len() < 80, "{} words: {vocab:?}", vocab.len());
    }

    #[test]
    fn objects_inside_central_square() {
        for scene in scenes(3000, 21) {
            let (x0, y0) = (scene.crop_x as f32, scene.crop_y as f32);
            let side = scene.crop_size as f32;
            assert_eq!(scene.crop_size, scene.width.min(scene.height));
            // Leave room for rounding in resize + center crop.
            let margin = 2.0f32.max(0.02 * side);
            for o in &scene.objects {
                assert!(o.cx - o.radius >= x0 + margin, "{scene:?}");
                assert!(o.cx + o.radius <= x0 + side - margin, "{scene:?}");
                assert!(o.cy - o.radius >= y0 + margin, "{scene:?}");
                assert!(o.cy + o.radius <= y0 + side - margin, "{scene:?}");
            }
            // Objects never overlap and are listed in reading order.
            for (i, a) in scene.objects.iter().enumerate() {
                for b in &scene.objects[i + 1..] {
                    let d = ((a.cx - b.cx).powi(2) + (a.cy - b.cy).powi(2)).sqrt();
                    assert!(d > a.radius + b.radius, "{scene:?}");
                    match scene.layout {
                        Layout::Row => assert!(a.cx < b.cx),
                        Layout::Column => assert!(a.cy < b.cy),
                        Layout::Single(_) => unreachable!(),
                    }
                }
            }
        }
    }

    #[test]
    fn rendered_pixels_outside_crop_are_background() {
        for scene in scenes(40, 9) {
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

    #[test]
    fn image_sizes_vary() {
        let all = scenes(500, 2);
        let widths: BTreeSet<u32> = all.iter().map(|s| s.width).collect();
        let heights: BTreeSet<u32> = all.iter().map(|s| s.height).collect();
        assert!(widths.len() > 100 && heights.len() > 100);
        assert!(all.iter().any(|s| s.width > s.height + 100));
        assert!(all.iter().any(|s| s.height > s.width + 100));
        assert!(all.iter().all(|s| (MIN_SIDE..=MAX_SIDE).contains(&s.width)
            && (MIN_SIDE..=MAX_SIDE).contains(&s.height)));
        // All object counts, layouts, shapes and colours occur.
        for n in 1..=3 {
            assert!(all.iter().any(|s| s.objects.len() == n));
        }
        for shape in Shape::ALL {
            assert!(all
                .iter()
                .any(|s| s.objects.iter().any(|o| o.shape == shape)));
        }
        for color in Color::ALL {
            assert!(all
                .iter()
                .any(|s| s.objects.iter().any(|o| o.color == color)));
        }
        assert!(all.iter().any(|s| s.layout == Layout::Row));
        assert!(all.iter().any(|s| s.layout == Layout::Column));
    }
}
