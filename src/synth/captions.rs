//! Captions of a scene: five short sentences that are true for it, drawn from templates with
//! the scene's own caption seed, and their Karpathy-style tokens.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::scene::{Color, Layout, Position, Scene, SceneObject, Shape};

/// Number of captions per image.
pub const CAPTIONS_PER_IMAGE: usize = 5;

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

#[cfg(test)]
mod tests {
    use super::super::scene::{random_scenes, Background, Size};
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn captions_match_scene() {
        let colors: Vec<&str> = Color::ALL.iter().map(|c| c.word()).collect();
        let shapes: Vec<Shape> = Shape::ALL.to_vec();
        for scene in random_scenes(2000, 11) {
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
        for scene in random_scenes(2000, 13) {
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
        let all = random_scenes(300, 5);
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
}
