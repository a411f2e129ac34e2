//! Recordings to replay through a [`crate::Monitor`]: CSV files (process data, SKAB) and
//! MATLAB v5 files (raw vibration, CWRU), as interleaved frames.

use crate::error::{Result, SensorError};
use crate::{csv, mat};
use std::path::Path;

/// A recording as frames of one value per channel.
#[derive(Debug, Clone, PartialEq)]
pub struct Recording {
    pub file: String,
    pub channels: Vec<String>,
    /// Interleaved: frame `i` is `data[i * channels.len()..(i + 1) * channels.len()]`.
    pub data: Vec<f64>,
    /// Per-frame timestamps, seconds (CSV with a time column).
    pub times: Option<Vec<f64>>,
    /// Label columns (`anomaly`, `changepoint`), per frame.
    pub labels: Vec<(String, Vec<f64>)>,
    /// Values that were empty, not numbers, NaN or infinite.
    pub bad_values: usize,
}

impl Recording {
    pub fn frames(&self) -> usize {
        self.data.len() / self.channels.len().max(1)
    }

    pub fn frame(&self, i: usize) -> &[f64] {
        let c = self.channels.len();
        &self.data[i * c..(i + 1) * c]
    }

    pub fn label(&self, name: &str) -> Option<&[f64]> {
        self.labels
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// Frames `[start, end)` as a new recording.
    pub fn slice(&self, start: usize, end: usize) -> Recording {
        let c = self.channels.len();
        let end = end.min(self.frames());
        let start = start.min(end);
        Recording {
            file: self.file.clone(),
            channels: self.channels.clone(),
            data: self.data[start * c..end * c].to_vec(),
            times: self.times.as_ref().map(|t| t[start..end].to_vec()),
            labels: self
                .labels
                .iter()
                .map(|(n, v)| (n.clone(), v[start..end].to_vec()))
                .collect(),
            bad_values: self.data[start * c..end * c]
                .iter()
                .filter(|v| !v.is_finite())
                .count(),
        }
    }
}

/// Loads a `.csv` or `.mat` file. `channels` picks and orders them: CSV column names, or
/// for MATLAB files a variable name or the part of a CWRU name between `_` and `_time`
/// (`DE` finds `X097_DE_time`). `None` takes every sensor column (CSV) or every `*_time`
/// vector (MATLAB).
pub fn load(path: &Path, channels: Option<&[String]>) -> Result<Recording> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    match ext.as_str() {
        "csv" | "txt" => {
            let d = csv::read_csv(path, channels)?;
            let bad_values = d.rows.iter().flatten().filter(|v| !v.is_finite()).count();
            let times = (!d.times.is_empty()).then_some(d.times);
            Ok(Recording {
                file: d.file,
                channels: d.channels,
                data: d.rows.into_iter().flatten().collect(),
                times,
                labels: d.labels,
                bad_values,
            })
        }
        "mat" => {
            let file = path.display().to_string();
            let arrays = mat::read_mat(path)?;
            let vectors: Vec<&mat::MatArray> = arrays.iter().filter(|a| a.values.len() > 1).collect();
            let picked: Vec<(String, &mat::MatArray)> = match channels {
                Some(want) => want
                    .iter()
                    .map(|w| {
                        mat::find(&arrays, w)
                            .or_else(|| mat::find(&arrays, &format!("_{w}_time")))
                            .map(|a| (w.clone(), a))
                            .ok_or_else(|| SensorError::MissingColumn {
                                file: file.clone(),
                                column: w.clone(),
                                present: vectors.iter().map(|a| a.name.as_str()).collect::<Vec<_>>().join(", "),
                            })
                    })
                    .collect::<Result<_>>()?,
                None => vectors
                    .iter()
                    .filter(|a| a.name.ends_with("_time"))
                    .map(|a| {
                        let short = a.name.trim_end_matches("_time").rsplit('_').next().unwrap_or(&a.name);
                        (short.to_string(), *a)
                    })
                    .collect(),
            };
            if picked.is_empty() {
                return Err(SensorError::Input {
                    file,
                    reason: "no `*_time` signal vectors; name the variables to read".into(),
                });
            }
            let frames = picked.iter().map(|(_, a)| a.values.len()).min().unwrap_or(0);
            let mut data = Vec::with_capacity(frames * picked.len());
            for i in 0..frames {
                for (_, a) in &picked {
                    data.push(a.values[i]);
                }
            }
            let bad_values = data.iter().filter(|v| !v.is_finite()).count();
            Ok(Recording {
                file,
                channels: picked.into_iter().map(|(n, _)| n).collect(),
                data,
                times: None,
                labels: Vec::new(),
                bad_values,
            })
        }
        _ => Err(SensorError::Input {
            file: path.display().to_string(),
            reason: "unknown file type: give a .csv (process data, `;` or `,` separated) or a .mat (MATLAB v5)".into(),
        }),
    }
}
