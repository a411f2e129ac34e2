//! Raw image → model input tensor, exactly as the manifest's [`Preprocess`] says.

use crate::error::{Result, RuntimeError};
use crate::manifest::{ChannelOrder, InputSpec, Interpolation, Layout, Preprocess, Resize};
use image::imageops::FilterType;
use image::DynamicImage;

/// File extensions read as images.
pub const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "bmp", "tif", "tiff", "webp"];

/// The image files directly inside `dir`, sorted by name.
pub fn list_images(dir: &std::path::Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    let mut found: Vec<std::path::PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|x| x.to_str())
                    .is_some_and(|x| IMAGE_EXTENSIONS.contains(&x.to_ascii_lowercase().as_str()))
        })
        .collect();
    found.sort();
    Ok(found)
}

/// Reads and decodes an image file.
pub fn load(path: &std::path::Path) -> Result<DynamicImage> {
    let bytes = std::fs::read(path).map_err(|source| RuntimeError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    decode(&path.display().to_string(), &bytes)
}

/// Decodes an encoded image (JPEG, PNG, BMP, TIFF, WebP), detecting the format from its bytes.
pub fn decode(name: &str, bytes: &[u8]) -> Result<DynamicImage> {
    image::load_from_memory(bytes).map_err(|e| RuntimeError::Image {
        name: name.to_string(),
        reason: e.to_string(),
    })
}

fn filter(i: Interpolation) -> FilterType {
    match i {
        Interpolation::Nearest => FilterType::Nearest,
        Interpolation::Bilinear => FilterType::Triangle,
        Interpolation::Bicubic => FilterType::CatmullRom,
        Interpolation::Lanczos3 => FilterType::Lanczos3,
    }
}

/// Size after the resize step for an image of `w`×`h`.
pub fn resized_size(resize: Resize, w: u32, h: u32) -> (u32, u32) {
    match resize {
        Resize::Exact { width, height } => (width, height),
        Resize::ShorterSide { size } => {
            let scale = size as f64 / w.min(h).max(1) as f64;
            if w <= h {
                (size, ((h as f64 * scale).round() as u32).max(1))
            } else {
                (((w as f64 * scale).round() as u32).max(1), size)
            }
        }
    }
}

/// Geometry only: resize and center crop, then check against the model's input size.
fn geometry(p: &Preprocess, img: &DynamicImage, want_w: u32, want_h: u32) -> Result<DynamicImage> {
    let (rw, rh) = resized_size(p.resize, img.width(), img.height());
    let mut out = if (rw, rh) == (img.width(), img.height()) {
        img.clone()
    } else {
        img.resize_exact(rw, rh, filter(p.interpolation))
    };
    if let Some([cw, ch]) = p.crop {
        if cw > out.width() || ch > out.height() {
            return Err(RuntimeError::Input(format!(
                "after resizing to {}x{} the image is smaller than the {cw}x{ch} crop",
                out.width(),
                out.height()
            )));
        }
        let x = (out.width() - cw) / 2;
        let y = (out.height() - ch) / 2;
        out = out.crop_imm(x, y, cw, ch);
    }
    if (out.width(), out.height()) != (want_w, want_h) {
        return Err(RuntimeError::Input(format!(
            "preprocessing gives {}x{} but the model takes {want_w}x{want_h}",
            out.width(),
            out.height()
        )));
    }
    Ok(out)
}

/// The image's channels as f32 planes (row-major), in the model's channel order.
fn planes(img: &DynamicImage, order: ChannelOrder) -> Vec<Vec<f32>> {
    match order {
        ChannelOrder::Gray => vec![img.to_luma8().pixels().map(|p| p.0[0] as f32).collect()],
        order => {
            let rgb = img.to_rgb8();
            let mut per: Vec<Vec<f32>> = (0..3)
                .map(|c| rgb.pixels().map(|p| p.0[c] as f32).collect())
                .collect();
            if order == ChannelOrder::Bgr {
                per.swap(0, 2);
            }
            per
        }
    }
}

/// Mean and standard deviation of one plane.
fn plane_stats(plane: &[f32]) -> (f32, f32) {
    let n = plane.len().max(1) as f64;
    let (sum, sq) = plane.iter().fold((0f64, 0f64), |(s, q), &v| {
        let v = v as f64;
        (s + v, q + v * v)
    });
    let mean = sum / n;
    (mean as f32, (sq / n - mean * mean).max(0.0).sqrt() as f32)
}

/// Sliding-window sums of `len` values read with `stride` from `src[start..]` over the window
/// `[i - r, i + r]` cut at the ends, written to `dst` (same positions).
fn box_sums(src: &[f64], start: usize, stride: usize, len: usize, r: usize, dst: &mut [f64]) {
    let at = |i: usize| src[start + i * stride];
    let mut sum: f64 = (0..len.min(r + 1)).map(at).sum();
    for i in 0..len {
        dst[start + i * stride] = sum;
        if i + r + 1 < len {
            sum += at(i + r + 1);
        }
        if i >= r {
            sum -= at(i - r);
        }
    }
}

/// `v - mean of the k×k window around v + 128` for every pixel (windows cut at the edges, so
/// a border pixel is compared with the part of the window inside the image).
fn flatten(plane: &mut [f32], w: usize, h: usize, k: u32) {
    let r = (k / 2) as usize;
    let src: Vec<f64> = plane.iter().map(|&v| v as f64).collect();
    let mut rows = vec![0f64; src.len()];
    for y in 0..h {
        box_sums(&src, y * w, 1, w, r, &mut rows);
    }
    let mut sums = vec![0f64; src.len()];
    for x in 0..w {
        box_sums(&rows, x, w, h, r, &mut sums);
    }
    let count = |i: usize, n: usize| (i.min(r) + (n - 1 - i).min(r) + 1) as f64;
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            let mean = sums[i] / (count(x, w) * count(y, h));
            plane[i] = (src[i] - mean + 128.0) as f32;
        }
    }
}

/// Turns a decoded image of any size or color type into the f32 input tensor's values
/// (batch 1), in the layout of `spec`.
pub fn image_to_input(spec: &InputSpec, img: &DynamicImage) -> Result<Vec<f32>> {
    let p = spec.preprocess.as_ref().ok_or_else(|| {
        RuntimeError::Input(format!(
            "input '{}' takes no image (no preprocessing)",
            spec.name
        ))
    })?;
    let (n, c, h, w) = spec.nchw().ok_or_else(|| {
        RuntimeError::Input(format!(
            "input '{}' of shape {:?} is not an image tensor",
            spec.name, spec.shape
        ))
    })?;
    if n != 1 {
        return Err(RuntimeError::Input(format!(
            "batch size {n} is not supported yet (use 1)"
        )));
    }
    if c != p.channels.count() || p.mean.len() != c || p.std.len() != c {
        return Err(RuntimeError::BadManifest(format!(
            "input '{}' has {c} channels but preprocessing gives {} (mean {}, std {})",
            spec.name,
            p.channels.count(),
            p.mean.len(),
            p.std.len()
        )));
    }
    let img = geometry(p, img, w as u32, h as u32)?;
    let mut planes = planes(&img, p.channels);
    if let Some(k) = p.flatten {
        for plane in &mut planes {
            flatten(plane, w, h, k);
        }
    }
    let plane = h * w;
    let mut out = vec![0f32; c * plane];
    for (ch, values) in planes.iter().enumerate() {
        // Per-channel affine map: (v * scale - mean) / std == v * a + b.
        let mut a = p.scale / p.std[ch];
        let mut b = -p.mean[ch] / p.std[ch];
        if p.standardize {
            // v' = (v - mu) / sigma * 48 + 128, folded into the same affine map.
            let (mu, sigma) = plane_stats(values);
            let k = 48.0 / sigma.max(1.0);
            b += a * (128.0 - mu * k);
            a *= k;
        }
        for (pixel, &v) in values.iter().enumerate() {
            let value = v * a + b;
            match spec.layout {
                Layout::Nchw => out[ch * plane + pixel] = value,
                Layout::Nhwc => out[pixel * c + ch] = value,
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::DType;
    use image::{GrayImage, Rgb, RgbImage};

    fn spec(layout: Layout, channels: ChannelOrder, shape: Vec<usize>) -> InputSpec {
        let c = channels.count();
        InputSpec {
            name: "x".into(),
            shape,
            dtype: DType::F32,
            layout,
            preprocess: Some(Preprocess {
                resize: Resize::ShorterSide { size: 4 },
                interpolation: Interpolation::Nearest,
                crop: Some([2, 2]),
                channels,
                scale: 1.0,
                mean: vec![10.0; c],
                std: vec![2.0; c],
                standardize: false,
                flatten: None,
            }),
        }
    }

    /// A 4x6 image whose pixel (x, y) is (x, y, 100 + x + 10*y).
    fn image() -> DynamicImage {
        DynamicImage::ImageRgb8(RgbImage::from_fn(4, 6, |x, y| {
            Rgb([x as u8, y as u8, (100 + x + 10 * y) as u8])
        }))
    }

    #[test]
    fn crop_channel_order_and_normalization_nchw() {
        let s = spec(Layout::Nchw, ChannelOrder::Bgr, vec![1, 3, 2, 2]);
        let v = image_to_input(&s, &image()).unwrap();
        // Shorter side 4 already: no resize. Center crop 2x2 of 4x6 starts at (1, 2).
        // Channel 0 is blue = 100 + x + 10y; (v - 10) / 2.
        let blue = |x: f32, y: f32| (100.0 + x + 10.0 * y - 10.0) / 2.0;
        assert_eq!(
            &v[0..4],
            &[blue(1., 2.), blue(2., 2.), blue(1., 3.), blue(2., 3.)]
        );
        // Channel 1 is green = y.
        assert_eq!(&v[4..8], &[-4.0, -4.0, -3.5, -3.5]);
        // Channel 2 is red = x.
        assert_eq!(&v[8..12], &[-4.5, -4.0, -4.5, -4.0]);
    }

    #[test]
    fn nhwc_interleaves_channels() {
        let s = spec(Layout::Nhwc, ChannelOrder::Rgb, vec![1, 2, 2, 3]);
        let v = image_to_input(&s, &image()).unwrap();
        assert_eq!(
            &v[0..3],
            &[(1.0 - 10.0) / 2.0, (2.0 - 10.0) / 2.0, (121.0 - 10.0) / 2.0]
        );
    }

    #[test]
    fn grayscale_images_feed_rgb_models_and_gray_models() {
        let gray = DynamicImage::ImageLuma8(GrayImage::from_pixel(8, 8, image::Luma([50])));
        let rgb = spec(Layout::Nchw, ChannelOrder::Rgb, vec![1, 3, 2, 2]);
        let v = image_to_input(&rgb, &gray).unwrap();
        assert!(v.iter().all(|x| *x == 20.0), "{v:?}");
        let g = spec(Layout::Nchw, ChannelOrder::Gray, vec![1, 1, 2, 2]);
        assert_eq!(image_to_input(&g, &image()).unwrap().len(), 4);
    }

    #[test]
    fn any_size_is_resized_but_too_small_for_the_crop_is_refused() {
        let s = spec(Layout::Nchw, ChannelOrder::Rgb, vec![1, 3, 2, 2]);
        let big = DynamicImage::ImageRgb8(RgbImage::new(640, 480));
        assert_eq!(image_to_input(&s, &big).unwrap().len(), 12);
        let mut s2 = s.clone();
        if let Some(p) = s2.preprocess.as_mut() {
            p.resize = Resize::Exact {
                width: 1,
                height: 1,
            };
        }
        let err = image_to_input(&s2, &big).unwrap_err().to_string();
        assert!(err.contains("smaller than the 2x2 crop"), "{err}");
    }

    #[test]
    fn standardize_removes_exposure_differences() {
        let mut s = spec(Layout::Nchw, ChannelOrder::Gray, vec![1, 1, 2, 2]);
        if let Some(p) = s.preprocess.as_mut() {
            p.resize = Resize::Exact {
                width: 2,
                height: 2,
            };
            p.crop = None;
            p.mean = vec![128.0];
            p.std = vec![48.0];
            p.standardize = true;
        }
        let dark = GrayImage::from_raw(2, 2, vec![10, 20, 10, 20])
            .map(DynamicImage::ImageLuma8)
            .unwrap();
        let bright = GrayImage::from_raw(2, 2, vec![200, 240, 200, 240])
            .map(DynamicImage::ImageLuma8)
            .unwrap();
        let (d, b) = (
            image_to_input(&s, &dark).unwrap(),
            image_to_input(&s, &bright).unwrap(),
        );
        for (x, y) in d.iter().zip(&b) {
            assert!((x - y).abs() < 1e-5, "{d:?} vs {b:?}");
        }
        assert!(
            (d[0] + 1.0).abs() < 1e-5 && (d[1] - 1.0).abs() < 1e-5,
            "{d:?}"
        );
    }

    #[test]
    fn flatten_removes_shading_and_keeps_a_spot() {
        // A horizontal brightness ramp (uneven lighting) with a dark 2x2 spot.
        let img = GrayImage::from_fn(32, 32, |x, y| {
            let ramp = 40 + 5 * x;
            let spot = (15..17).contains(&x) && (15..17).contains(&y);
            image::Luma([(if spot { ramp - 30 } else { ramp }) as u8])
        });
        let mut s = spec(Layout::Nchw, ChannelOrder::Gray, vec![1, 1, 32, 32]);
        if let Some(p) = s.preprocess.as_mut() {
            p.resize = Resize::Exact {
                width: 32,
                height: 32,
            };
            p.crop = None;
            p.mean = vec![0.0];
            p.std = vec![1.0];
            p.flatten = Some(9);
        }
        let v = image_to_input(&s, &DynamicImage::ImageLuma8(img)).unwrap();
        let at = |x: usize, y: usize| v[y * 32 + x];
        // On a linear ramp the window's mean is the centre value: the ramp is gone.
        for (x, y) in [(5, 5), (26, 20), (10, 28)] {
            assert!((at(x, y) - 128.0).abs() < 1e-3, "({x}, {y}): {}", at(x, y));
        }
        // The spot keeps its depth (30 less a 4/81 share of itself in the window).
        assert!(
            (at(15, 15) - (128.0 - 30.0 + 30.0 * 4.0 / 81.0)).abs() < 0.2,
            "{}",
            at(15, 15)
        );
        // At the edge the window is cut: the left column sees only brighter neighbours.
        assert!(at(0, 10) < 128.0 - 5.0, "{}", at(0, 10));
    }

    #[test]
    fn shorter_side_keeps_aspect() {
        assert_eq!(
            resized_size(Resize::ShorterSide { size: 256 }, 640, 480),
            (341, 256)
        );
        assert_eq!(
            resized_size(Resize::ShorterSide { size: 256 }, 480, 640),
            (256, 341)
        );
    }

    #[test]
    fn undecodable_bytes_are_an_image_error() {
        let err = decode("x.jpg", b"\xff\xd8\xff garbage")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("cannot decode image x.jpg"), "{err}");
    }
}
