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

/// Mean and standard deviation of each channel, in the model's channel order.
fn channel_stats(img: &DynamicImage, order: ChannelOrder) -> Vec<(f32, f32)> {
    let stats = |values: &mut dyn Iterator<Item = u8>| {
        let (mut n, mut sum, mut sq) = (0f64, 0f64, 0f64);
        for v in values {
            let v = v as f64;
            n += 1.0;
            sum += v;
            sq += v * v;
        }
        let mean = sum / n.max(1.0);
        (
            (mean) as f32,
            ((sq / n.max(1.0) - mean * mean).max(0.0).sqrt()) as f32,
        )
    };
    match order {
        ChannelOrder::Gray => vec![stats(&mut img.to_luma8().pixels().map(|p| p.0[0]))],
        order => {
            let rgb = img.to_rgb8();
            let mut per: Vec<(f32, f32)> = (0..3)
                .map(|c| stats(&mut rgb.pixels().map(|p| p.0[c])))
                .collect();
            if order == ChannelOrder::Bgr {
                per.swap(0, 2);
            }
            per
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
    // Per-channel affine map: (v * scale - mean) / std == v * a + b.
    let mut a: Vec<f32> = p.std.iter().map(|s| p.scale / s).collect();
    let mut b: Vec<f32> = p.mean.iter().zip(&p.std).map(|(m, s)| -m / s).collect();
    if p.standardize {
        // v' = (v - mu) / sigma * 48 + 128, folded into the same affine map.
        for (ch, (mu, sigma)) in channel_stats(&img, p.channels).into_iter().enumerate() {
            let k = 48.0 / sigma.max(1.0);
            b[ch] += a[ch] * (128.0 - mu * k);
            a[ch] *= k;
        }
    }
    let plane = h * w;
    let mut out = vec![0f32; c * plane];
    let mut put = |pixel: usize, ch: usize, v: u8| {
        let value = v as f32 * a[ch] + b[ch];
        match spec.layout {
            Layout::Nchw => out[ch * plane + pixel] = value,
            Layout::Nhwc => out[pixel * c + ch] = value,
        }
    };
    match p.channels {
        ChannelOrder::Gray => {
            for (i, px) in img.to_luma8().pixels().enumerate() {
                put(i, 0, px.0[0]);
            }
        }
        order => {
            let rgb = img.to_rgb8();
            for (i, px) in rgb.pixels().enumerate() {
                let [r, g, b] = px.0;
                let (c0, c2) = if order == ChannelOrder::Bgr {
                    (b, r)
                } else {
                    (r, b)
                };
                put(i, 0, c0);
                put(i, 1, g);
                put(i, 2, c2);
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
