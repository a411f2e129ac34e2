//! Anomaly maps → decisions: normalized score, OK/NG, defect regions.
//!
//! A detector artifact's graph computes the map itself (backbone, patch aggregation and the
//! nearest-neighbour search against its memory bank are all graph operators); this module
//! turns the map into what a line needs.

use crate::error::{Result, RuntimeError};
use crate::manifest::{AnomalySpec, DefectTypes, Preprocess};
use crate::preprocess::resized_size;
use serde::Serialize;

/// OK or NG.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Verdict {
    Ok,
    Ng,
}

/// A connected area of the map above the threshold, in the original image's pixels.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Region {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
    /// Share of the inspected area, in percent.
    pub area_percent: f32,
    /// Highest normalized score inside the region.
    pub peak_score: f32,
}

/// The anomaly map, normalized (1.0 = threshold), row-major.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AnomalyMap {
    pub width: usize,
    pub height: usize,
    pub values: Vec<f32>,
}

impl AnomalyMap {
    /// The map's value at each pixel of a `width` x `height` image (bilinear between grid cell
    /// centres; pixels outside the model's input window get the map's minimum).
    pub fn to_pixels(&self, window: (f32, f32, f32, f32), width: u32, height: u32) -> Vec<f32> {
        let map = self;
        let (x0, y0, x1, y1) = window;
        let floor = map.values.iter().copied().fold(f32::INFINITY, f32::min);
        let at = |r: usize, c: usize| map.values[r * map.width + c];
        let mut out = Vec::with_capacity((width * height) as usize);
        for y in 0..height {
            let fy = (y as f32 + 0.5) / height as f32;
            for x in 0..width {
                let fx = (x as f32 + 0.5) / width as f32;
                if fx < x0 || fx > x1 || fy < y0 || fy > y1 {
                    out.push(floor);
                    continue;
                }
                let u = ((fx - x0) / (x1 - x0) * map.width as f32 - 0.5)
                    .clamp(0.0, (map.width - 1) as f32);
                let v = ((fy - y0) / (y1 - y0) * map.height as f32 - 0.5)
                    .clamp(0.0, (map.height - 1) as f32);
                let (c0, r0) = (u.floor() as usize, v.floor() as usize);
                let (c1, r1) = ((c0 + 1).min(map.width - 1), (r0 + 1).min(map.height - 1));
                let (du, dv) = (u - c0 as f32, v - r0 as f32);
                let top = at(r0, c0) * (1.0 - du) + at(r0, c1) * du;
                let bottom = at(r1, c0) * (1.0 - du) + at(r1, c1) * du;
                out.push(top * (1.0 - dv) + bottom * dv);
            }
        }
        out
    }
}

/// Heat colour for a normalized score: transparent below 0.75, then blue → yellow (at the
/// threshold's neighbourhood) → red at 2.
fn heat(v: f32) -> Option<([f32; 3], f32)> {
    if v.is_nan() || v <= 0.75 {
        return None;
    }
    let t = ((v - 0.75) / 1.25).clamp(0.0, 1.0);
    let rgb = if t < 0.5 {
        [2.0 * t * 255.0, 2.0 * t * 255.0, (1.0 - 2.0 * t) * 255.0]
    } else {
        [255.0, (2.0 - 2.0 * t) * 255.0, 0.0]
    };
    Some((rgb, 0.25 + 0.35 * t))
}

/// The image with the anomaly map blended over it and each defect region outlined.
pub fn overlay(
    image: &image::DynamicImage,
    result: &AnomalyResult,
    window: (f32, f32, f32, f32),
) -> image::RgbImage {
    let mut out = image.to_rgb8();
    let (w, h) = out.dimensions();
    let values = result.map.to_pixels(window, w, h);
    for (px, v) in out.pixels_mut().zip(values) {
        if let Some((rgb, a)) = heat(v) {
            for (channel, heat) in px.0.iter_mut().zip(rgb) {
                *channel = (*channel as f32 * (1.0 - a) + heat * a).round() as u8;
            }
        }
    }
    let red = image::Rgb([255, 0, 0]);
    for r in &result.regions {
        let (x1, y1) = (
            (r.x + r.width).min(w) as i64 - 1,
            (r.y + r.height).min(h) as i64 - 1,
        );
        for t in 0..2i64 {
            for x in r.x as i64..=x1 {
                for y in [r.y as i64 + t, y1 - t] {
                    if (0..w as i64).contains(&x) && (0..h as i64).contains(&y) {
                        out.put_pixel(x as u32, y as u32, red);
                    }
                }
            }
            for y in r.y as i64..=y1 {
                for x in [r.x as i64 + t, x1 - t] {
                    if (0..w as i64).contains(&x) && (0..h as i64).contains(&y) {
                        out.put_pixel(x as u32, y as u32, red);
                    }
                }
            }
        }
    }
    out
}

/// What the detector says about one image.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AnomalyResult {
    pub verdict: Verdict,
    /// Image score divided by the threshold: above 1.0 is NG.
    pub score: f32,
    /// Image score before normalization (largest patch distance).
    pub raw_score: f32,
    pub regions: Vec<Region>,
    /// With a defect-type head: the most likely type if the part is defective (given for
    /// every image, so a caller with its own threshold can use it; show it for NG parts).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub defect_type: Option<DefectType>,
    #[serde(skip)]
    pub map: AnomalyMap,
}

/// Where the model input lies in the original image, as fractions (x0, y0, x1, y1).
pub fn input_window(p: &Preprocess, width: u32, height: u32) -> (f32, f32, f32, f32) {
    match p.crop {
        None => (0.0, 0.0, 1.0, 1.0),
        Some([cw, ch]) => {
            let (rw, rh) = resized_size(p.resize, width, height);
            let ox = rw.saturating_sub(cw) / 2;
            let oy = rh.saturating_sub(ch) / 2;
            (
                ox as f32 / rw as f32,
                oy as f32 / rh as f32,
                (ox + cw) as f32 / rw as f32,
                (oy + ch) as f32 / rh as f32,
            )
        }
    }
}

/// Whether cell (r, c) of an `h` x `w` map counts for the image score (not in the border).
fn scored(spec: &AnomalySpec, r: usize, c: usize, h: usize, w: usize) -> bool {
    let b = spec.score_border;
    if 2 * b >= h || 2 * b >= w {
        return true;
    }
    r >= b && r < h - b && c >= b && c < w - b
}

/// The raw image score of a map: its largest value outside the ignored border, or the mean of
/// its `score_top_k` largest (NaN counts as infinitely anomalous).
pub fn image_score(spec: &AnomalySpec, values: &[f32], height: usize, width: usize) -> f32 {
    let mut cells: Vec<f32> = values
        .iter()
        .enumerate()
        .filter(|(i, _)| scored(spec, i / width.max(1), i % width.max(1), height, width))
        .map(|(_, v)| if v.is_nan() { f32::INFINITY } else { *v })
        .collect();
    let k = spec.score_top_k.clamp(1, cells.len().max(1));
    if cells.is_empty() {
        return 0.0;
    }
    if k == 1 {
        return cells.iter().copied().fold(0f32, f32::max);
    }
    cells.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    cells[..k].iter().sum::<f32>() / k as f32
}

/// A defect type and the head's probability for it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DefectType {
    pub label: String,
    pub probability: f32,
}

/// The mean patch feature of the `pool_cells` most anomalous scored cells of a map: what the
/// defect-type head reads. `features` is [cells, dim] in map order.
pub fn pooled_features(
    spec: &AnomalySpec,
    pool_cells: usize,
    map: &[f32],
    height: usize,
    width: usize,
    features: &[f32],
) -> Result<Vec<f32>> {
    let cells = height * width;
    let dim = spec.feature_dim;
    if map.len() != cells || features.len() != cells * dim {
        return Err(RuntimeError::BadManifest(format!(
            "defect-type features: {} values and a map of {} for a {height}x{width} map of {dim}-value patches",
            features.len(),
            map.len()
        )));
    }
    let mut order: Vec<usize> = (0..cells)
        .filter(|&i| scored(spec, i / width, i % width, height, width))
        .collect();
    let key = |i: usize| {
        if map[i].is_nan() {
            f32::INFINITY
        } else {
            map[i]
        }
    };
    let k = pool_cells.clamp(1, order.len().max(1));
    if k < order.len() {
        // Only which cells are hottest matters, not their order.
        order.select_nth_unstable_by(k - 1, |&a, &b| key(b).total_cmp(&key(a)));
        order.truncate(k);
    }
    let mut pooled = vec![0f32; dim];
    for &i in &order {
        for (p, f) in pooled.iter_mut().zip(&features[i * dim..(i + 1) * dim]) {
            *p += f;
        }
    }
    let n = order.len().max(1) as f32;
    pooled.iter_mut().for_each(|p| *p /= n);
    Ok(pooled)
}

/// Softmax of a linear layer: `weights` row-major [bias.len(), x.len()].
pub fn linear_softmax(weights: &[f32], bias: &[f32], x: &[f32]) -> Vec<f32> {
    let dim = x.len();
    let logits: Vec<f32> = bias
        .iter()
        .enumerate()
        .map(|(k, b)| {
            let row = weights.get(k * dim..(k + 1) * dim).unwrap_or(&[]);
            b + row.iter().zip(x).map(|(w, v)| w * v).sum::<f32>()
        })
        .collect();
    crate::model::softmax(&logits)
}

/// The most likely defect type of an image from its raw map and patch features; `None` when
/// the features are not finite (no type is better than a made-up one).
pub fn defect_type(
    spec: &AnomalySpec,
    types: &DefectTypes,
    map: &[f32],
    height: usize,
    width: usize,
    features: &[f32],
) -> Result<Option<DefectType>> {
    let pooled = pooled_features(spec, types.pool_cells, map, height, width, features)?;
    let probs = linear_softmax(&types.weights, &types.bias, &pooled);
    if probs.iter().any(|p| !p.is_finite()) {
        return Ok(None);
    }
    Ok(probs
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(best, p)| DefectType {
            label: types.labels.get(best).cloned().unwrap_or_default(),
            probability: *p,
        }))
}

/// Scores a raw map (`values`, `height` x `width`, row-major) of an image of `image_size`.
pub fn analyse(
    spec: &AnomalySpec,
    preprocess: Option<&Preprocess>,
    values: &[f32],
    height: usize,
    width: usize,
    image_size: (u32, u32),
) -> AnomalyResult {
    let threshold = if spec.threshold > 0.0 {
        spec.threshold
    } else {
        f32::MIN_POSITIVE
    };
    let norm: Vec<f32> = values
        .iter()
        .map(|v| {
            if v.is_finite() {
                v / threshold
            } else {
                f32::INFINITY
            }
        })
        .collect();
    let raw_score = image_score(spec, values, height, width);
    let score = raw_score / threshold;
    let window = preprocess.map_or((0.0, 0.0, 1.0, 1.0), |p| {
        input_window(p, image_size.0, image_size.1)
    });
    let in_scope: Vec<f32> = norm
        .iter()
        .enumerate()
        .map(|(i, v)| {
            if scored(spec, i / width, i % width, height, width) {
                *v
            } else {
                0.0
            }
        })
        .collect();
    let regions = regions(&in_scope, height, width, window, image_size);
    AnomalyResult {
        verdict: if score > 1.0 {
            Verdict::Ng
        } else {
            Verdict::Ok
        },
        score,
        raw_score,
        regions,
        defect_type: None,
        map: AnomalyMap {
            width,
            height,
            values: norm,
        },
    }
}

/// Connected components (4-neighbour) of cells above 1.0, largest first.
fn regions(
    norm: &[f32],
    h: usize,
    w: usize,
    (x0, y0, x1, y1): (f32, f32, f32, f32),
    (iw, ih): (u32, u32),
) -> Vec<Region> {
    let mut seen = vec![false; norm.len()];
    let mut out = Vec::new();
    let mut stack = Vec::new();
    for start in 0..norm.len() {
        if seen[start] || norm[start] <= 1.0 {
            continue;
        }
        let (mut minr, mut maxr, mut minc, mut maxc) = (h, 0, w, 0);
        let (mut cells, mut peak) = (0usize, 0f32);
        seen[start] = true;
        stack.push(start);
        while let Some(i) = stack.pop() {
            let (r, c) = (i / w, i % w);
            cells += 1;
            peak = peak.max(norm[i]);
            (minr, maxr, minc, maxc) = (minr.min(r), maxr.max(r), minc.min(c), maxc.max(c));
            let mut visit = |j: usize| {
                if !seen[j] && norm[j] > 1.0 {
                    seen[j] = true;
                    stack.push(j);
                }
            };
            if r > 0 {
                visit(i - w);
            }
            if r + 1 < h {
                visit(i + w);
            }
            if c > 0 {
                visit(i - 1);
            }
            if c + 1 < w {
                visit(i + 1);
            }
        }
        // Grid cells → fractions of the model input → pixels of the original image.
        let fx = |c: usize| ((x0 + (x1 - x0) * c as f32 / w as f32) * iw as f32).round() as u32;
        let fy = |r: usize| ((y0 + (y1 - y0) * r as f32 / h as f32) * ih as f32).round() as u32;
        let (px0, py0, px1, py1) = (fx(minc), fy(minr), fx(maxc + 1), fy(maxr + 1));
        out.push(Region {
            x: px0,
            y: py0,
            width: px1.saturating_sub(px0).max(1),
            height: py1.saturating_sub(py0).max(1),
            area_percent: 100.0 * cells as f32 / norm.len() as f32,
            peak_score: peak,
        });
    }
    out.sort_by(|a, b| b.area_percent.total_cmp(&a.area_percent));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{ChannelOrder, Interpolation, Resize};

    fn spec(threshold: f32) -> AnomalySpec {
        AnomalySpec {
            map_output: "anomaly_map".into(),
            layers: vec![],
            feature_dim: 1,
            aggregation: 3,
            memory_rows: 1,
            threshold,
            threshold_method: "test".into(),
            training_images: 1,
            score_border: 0,
            score_top_k: 0,
            defect_types: None,
        }
    }

    #[test]
    fn a_clean_map_is_ok_and_a_hot_spot_is_one_ng_region() {
        let mut map = vec![1.0f32; 16];
        let r = analyse(&spec(2.0), None, &map, 4, 4, (400, 400));
        assert_eq!((r.verdict, r.score, r.regions.len()), (Verdict::Ok, 0.5, 0));
        // Two adjacent hot cells at row 1, columns 2-3; one lone hot cell at (3, 0).
        map[6] = 5.0;
        map[7] = 3.0;
        map[12] = 2.5;
        let r = analyse(&spec(2.0), None, &map, 4, 4, (400, 400));
        assert_eq!(r.verdict, Verdict::Ng);
        assert_eq!(r.score, 2.5);
        assert_eq!(r.regions.len(), 2);
        let big = &r.regions[0];
        assert_eq!((big.x, big.y, big.width, big.height), (200, 100, 200, 100));
        assert_eq!(big.area_percent, 12.5);
        assert_eq!(big.peak_score, 2.5);
    }

    #[test]
    fn the_defect_type_reads_the_features_of_the_hottest_cells() {
        // 3x3 map, 2-value patch features; the hot cells (4 and 5) carry "crack" features
        // (large first value), the cold ones "scratch" features: pooling only the two hottest
        // must say crack, pooling all nine scratch.
        let mut s = spec(1.0);
        s.feature_dim = 2;
        let map = [0.1, 0.1, 0.2, 0.1, 9.0, 8.0, 0.1, 0.3, 0.1];
        let mut features = vec![];
        for (i, _) in map.iter().enumerate() {
            features.extend(if i == 4 || i == 5 {
                [5.0, 0.0]
            } else {
                [0.0, 2.0]
            });
        }
        let mut types = DefectTypes {
            features_output: "neo_patches".into(),
            labels: vec!["crack".into(), "scratch".into()],
            pool_cells: 2,
            weights: vec![1.0, 0.0, 0.0, 1.0],
            bias: vec![0.0, 0.0],
            trained_on: vec![],
        };
        let t = defect_type(&s, &types, &map, 3, 3, &features)
            .unwrap()
            .unwrap();
        assert_eq!(t.label, "crack");
        assert!(
            (t.probability - 1.0 / (1.0 + (-5.0f32).exp())).abs() < 1e-6,
            "{t:?}"
        );
        types.pool_cells = 9;
        let t = defect_type(&s, &types, &map, 3, 3, &features)
            .unwrap()
            .unwrap();
        assert_eq!(t.label, "scratch", "{t:?}");
        // A NaN feature among the pooled ones gives no type rather than a made-up one.
        let mut bad = features.clone();
        bad[8] = f32::NAN;
        assert_eq!(defect_type(&s, &types, &map, 3, 3, &bad).unwrap(), None);
        // Features of the wrong size are an error, not a panic.
        assert!(defect_type(&s, &types, &map, 3, 3, &features[1..]).is_err());
    }

    #[test]
    fn regions_map_back_through_the_center_crop() {
        let p = Preprocess {
            resize: Resize::ShorterSide { size: 256 },
            interpolation: Interpolation::Bilinear,
            crop: Some([224, 224]),
            channels: ChannelOrder::Rgb,
            scale: 1.0,
            mean: vec![0.0; 3],
            std: vec![1.0; 3],
            standardize: false,
            flatten: None,
        };
        // 512x256 image → resized 512x256 → crop x 144..368, y 16..240.
        let (x0, y0, x1, y1) = input_window(&p, 512, 256);
        assert_eq!(
            (x0 * 512.0, y0 * 256.0, x1 * 512.0, y1 * 256.0),
            (144.0, 16.0, 368.0, 240.0)
        );
        let mut map = vec![0.0f32; 4];
        map[0] = 10.0; // top-left quarter of the crop
        let r = analyse(&spec(1.0), Some(&p), &map, 2, 2, (512, 256));
        assert_eq!(r.regions[0].x, 144);
        assert_eq!(r.regions[0].width, 112);
    }

    #[test]
    fn the_map_spreads_over_the_image_window() {
        let map = AnomalyMap {
            width: 2,
            height: 1,
            values: vec![0.0, 1.0],
        };
        let px = map.to_pixels((0.0, 0.0, 1.0, 1.0), 4, 1);
        assert_eq!(px, [0.0, 0.25, 0.75, 1.0]);
        // Outside a centre window the minimum is used.
        let px = map.to_pixels((0.25, 0.0, 0.75, 1.0), 4, 1);
        assert_eq!((px[0], px[3]), (0.0, 0.0));
    }

    #[test]
    fn overlay_colours_hot_cells_and_outlines_regions() {
        let img = image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(
            40,
            40,
            image::Rgb([128, 128, 128]),
        ));
        let mut map = vec![0.0f32; 16];
        map[5] = 4.0; // row 1, col 1 → pixels 10..20
        let r = analyse(&spec(1.0), None, &map, 4, 4, (40, 40));
        let o = overlay(&img, &r, (0.0, 0.0, 1.0, 1.0));
        assert_eq!(o.get_pixel(10, 10).0, [255, 0, 0], "region outline");
        assert_eq!(
            o.get_pixel(35, 35).0,
            [128, 128, 128],
            "cold cells untouched"
        );
        let hot = o.get_pixel(15, 15).0;
        assert!(
            hot[0] > 128 && hot[2] < 128,
            "hot centre is reddish: {hot:?}"
        );
    }

    #[test]
    fn the_border_can_be_left_out_of_the_score() {
        let mut map = vec![0.5f32; 16];
        map[0] = 9.0; // corner
        let mut s = spec(1.0);
        assert_eq!(analyse(&s, None, &map, 4, 4, (4, 4)).verdict, Verdict::Ng);
        s.score_border = 1;
        let r = analyse(&s, None, &map, 4, 4, (4, 4));
        assert_eq!((r.verdict, r.score, r.regions.len()), (Verdict::Ok, 0.5, 0));
        // A border too wide for the map is ignored rather than leaving nothing to score.
        s.score_border = 2;
        assert_eq!(image_score(&s, &map, 4, 4), 9.0);
        // The mean of the three largest: one outlier cell counts for a third.
        s.score_border = 0;
        s.score_top_k = 3;
        map[5] = 3.0;
        assert_eq!(image_score(&s, &map, 4, 4), (9.0 + 3.0 + 0.5) / 3.0);
    }

    #[test]
    fn nan_in_the_map_is_never_ok() {
        let r = analyse(&spec(1.0), None, &[0.1, f32::NAN], 1, 2, (10, 10));
        assert_eq!(r.verdict, Verdict::Ng);
    }
}
