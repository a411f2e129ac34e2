//! Model cards (`model.toml` beside the model) and command-line options: the preprocessing and
//! output contract the compiler writes into the manifest. Flags override the card.

use crate::error::{CompileError, Result};
use neo_runtime::manifest::{ChannelOrder, Interpolation, Layout, Resize, Scores, Task};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// A model card, as written in `model.toml`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Card {
    pub name: Option<String>,
    #[serde(default)]
    pub input: CardInput,
    #[serde(default)]
    pub preprocess: CardPreprocess,
    #[serde(default)]
    pub output: CardOutput,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CardInput {
    pub name: Option<String>,
    pub shape: Option<Vec<usize>>,
    pub layout: Option<Layout>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CardPreprocess {
    /// `256` (shorter side) or `[width, height]` (exact).
    pub resize: Option<ResizeSpec>,
    /// `224` or `[width, height]`: center crop after resizing.
    pub crop: Option<SizeSpec>,
    pub interpolation: Option<Interpolation>,
    pub channels: Option<ChannelOrder>,
    pub scale: Option<f32>,
    pub mean: Option<Vec<f32>>,
    pub std: Option<Vec<f32>>,
    /// Per-image standardization before mean/std (see the manifest's `standardize`).
    pub standardize: Option<bool>,
    /// Local-mean subtraction window in pixels (see the manifest's `flatten`).
    pub flatten: Option<u32>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CardOutput {
    /// Which graph outputs to keep (default: all).
    pub names: Option<Vec<String>>,
    pub task: Option<Task>,
    pub scores: Option<Scores>,
    /// Labels file, one per line, relative to the card.
    pub labels: Option<PathBuf>,
}

/// `256` or `[w, h]`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum ResizeSpec {
    ShorterSide(u32),
    Exact([u32; 2]),
}

impl ResizeSpec {
    pub fn to_resize(self) -> Resize {
        match self {
            ResizeSpec::ShorterSide(size) => Resize::ShorterSide { size },
            ResizeSpec::Exact([width, height]) => Resize::Exact { width, height },
        }
    }
}

/// `224` or `[w, h]`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum SizeSpec {
    Square(u32),
    Rect([u32; 2]),
}

impl SizeSpec {
    pub fn wh(self) -> [u32; 2] {
        match self {
            SizeSpec::Square(s) => [s, s],
            SizeSpec::Rect(r) => r,
        }
    }
}

impl Card {
    /// Reads a card file; a relative `labels` path is made relative to the card's folder.
    pub fn read(path: &Path) -> Result<Card> {
        let text = std::fs::read_to_string(path).map_err(|source| CompileError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut card: Card = toml::from_str(&text).map_err(|e| CompileError::Card {
            path: path.display().to_string(),
            message: e.message().to_string(),
        })?;
        if let Some(labels) = card.output.labels.as_mut() {
            if labels.is_relative() {
                *labels = path.parent().unwrap_or(Path::new(".")).join(&*labels);
            }
        }
        Ok(card)
    }

    /// The card for a model: `explicit` if given, else `model.toml` beside the model if present.
    pub fn for_model(model: &Path, explicit: Option<&Path>) -> Result<(Card, Option<PathBuf>)> {
        if let Some(p) = explicit {
            return Ok((Card::read(p)?, Some(p.to_path_buf())));
        }
        let beside = model.parent().unwrap_or(Path::new(".")).join("model.toml");
        if beside.is_file() {
            Ok((Card::read(&beside)?, Some(beside)))
        } else {
            Ok((Card::default(), None))
        }
    }
}

/// Parses `1,3,224,224` (also `1x3x224x224`).
pub fn parse_shape(s: &str) -> Result<Vec<usize>> {
    s.split([',', 'x'])
        .map(|d| {
            d.trim()
                .parse::<usize>()
                .ok()
                .filter(|d| *d > 0)
                .ok_or_else(|| {
                    CompileError::Options(format!(
                        "bad shape '{s}': expected positive integers like 1,3,224,224"
                    ))
                })
        })
        .collect()
}

/// Parses `104,117,123`.
pub fn parse_floats(what: &str, s: &str) -> Result<Vec<f32>> {
    s.split(',')
        .map(|v| {
            v.trim()
                .parse::<f32>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| {
                    CompileError::Options(format!(
                        "bad {what} '{s}': expected numbers like 0.485,0.456,0.406"
                    ))
                })
        })
        .collect()
}

/// Parses `256` (shorter side) or `224x224` (exact).
pub fn parse_resize(s: &str) -> Result<ResizeSpec> {
    match parse_size(s)? {
        SizeSpec::Square(n) if !s.contains('x') => Ok(ResizeSpec::ShorterSide(n)),
        other => Ok(ResizeSpec::Exact(other.wh())),
    }
}

/// Parses `224` or `224x200` (width x height).
pub fn parse_size(s: &str) -> Result<SizeSpec> {
    let bad = || CompileError::Options(format!("bad size '{s}': expected 224 or 224x224"));
    let parts: Vec<u32> = s
        .split('x')
        .map(|p| p.trim().parse::<u32>().ok().filter(|v| *v > 0))
        .collect::<Option<_>>()
        .ok_or_else(bad)?;
    match parts.as_slice() {
        [n] => Ok(SizeSpec::Square(*n)),
        [w, h] => Ok(SizeSpec::Rect([*w, *h])),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cards_and_options() {
        let card: Card = toml::from_str(
            r#"
            name = "sq"
            [input]
            shape = [1, 3, 224, 224]
            layout = "NCHW"
            [preprocess]
            resize = 256
            crop = 224
            channels = "bgr"
            mean = [104, 117, 123]
            std = [1, 1, 1]
            [output]
            task = "classification"
            scores = "probabilities"
            "#,
        )
        .unwrap();
        assert_eq!(card.preprocess.resize, Some(ResizeSpec::ShorterSide(256)));
        assert_eq!(card.preprocess.crop.map(SizeSpec::wh), Some([224, 224]));
        assert_eq!(card.preprocess.channels, Some(ChannelOrder::Bgr));
        assert_eq!(parse_shape("1x3x224x224").unwrap(), [1, 3, 224, 224]);
        assert!(parse_shape("1,3,?,224").is_err());
        assert_eq!(parse_resize("256").unwrap(), ResizeSpec::ShorterSide(256));
        assert_eq!(
            parse_resize("320x240").unwrap(),
            ResizeSpec::Exact([320, 240])
        );
        assert_eq!(parse_floats("mean", "0.5, 1").unwrap(), [0.5, 1.0]);
        assert!(parse_floats("mean", "a").is_err());
    }

    #[test]
    fn unknown_card_keys_are_refused() {
        assert!(toml::from_str::<Card>("[preprocess]\nmeen = [1]").is_err());
    }
}
