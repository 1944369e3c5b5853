//! Scene model: what an image shows (shapes, colours, sizes, positions, background) and the
//! random draw of one scene.

use rand::rngs::StdRng;
use rand::Rng;
use serde::{Deserialize, Serialize};

/// Smallest image side in pixels.
pub const MIN_SIDE: u32 = 160;
/// Largest image side in pixels.
pub const MAX_SIDE: u32 = 480;

/// Object radius (fraction of the crop square side) for small objects.
const SMALL_RADIUS: f32 = 0.08;
/// Object radius (fraction of the crop square side) for large objects.
const LARGE_RADIUS: f32 = 0.14;
/// Relative jitter of the object radius.
const RADIUS_JITTER: f32 = 0.04;

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

    /// Caption phrase naming the position in the image ("on the left side of the image").
    pub(super) fn long_phrase(self) -> &'static str {
        match self {
            Position::Center => "in the center of the image",
            Position::Left => "on the left side of the image",
            Position::Right => "on the right side of the image",
            Position::Top => "at the top of the image",
            Position::Bottom => "at the bottom of the image",
        }
    }

    /// Short caption phrase ("on the left").
    pub(super) fn short_phrase(self) -> &'static str {
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

/// `n` scenes drawn from `seed`, for the tests of every synth module.
#[cfg(test)]
pub(super) fn random_scenes(n: usize, seed: u64) -> Vec<Scene> {
    use rand::SeedableRng;
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| random_scene(&mut rng)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn objects_inside_central_square() {
        for scene in random_scenes(3000, 21) {
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
    fn image_sizes_vary() {
        let all = random_scenes(500, 2);
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
