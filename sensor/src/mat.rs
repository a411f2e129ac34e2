//! MATLAB v5 `.mat` reader for numeric arrays (the CWRU bearing data: `X097_DE_time` …).
//! Reads double, single and integer matrices, compressed (`miCOMPRESSED`) or not;
//! everything else in the file (cells, structs, strings) is skipped.

use crate::error::{Result, SensorError};
use std::path::Path;

/// A numeric variable: its name, dimensions and real values (column-major, as MATLAB
/// stores them).
#[derive(Debug, Clone, PartialEq)]
pub struct MatArray {
    pub name: String,
    pub dims: Vec<usize>,
    pub values: Vec<f64>,
}

pub fn read_mat(path: &Path) -> Result<Vec<MatArray>> {
    let bytes = std::fs::read(path).map_err(|source| SensorError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_mat(&path.display().to_string(), &bytes)
}

/// Finds a variable by exact name, or by suffix (`_DE_time` finds `X097_DE_time`).
pub fn find<'a>(arrays: &'a [MatArray], name_or_suffix: &str) -> Option<&'a MatArray> {
    arrays
        .iter()
        .find(|a| a.name == name_or_suffix)
        .or_else(|| arrays.iter().find(|a| a.name.ends_with(name_or_suffix)))
}

const MI_INT8: u32 = 1;
const MI_UINT8: u32 = 2;
const MI_INT16: u32 = 3;
const MI_UINT16: u32 = 4;
const MI_INT32: u32 = 5;
const MI_UINT32: u32 = 6;
const MI_SINGLE: u32 = 7;
const MI_DOUBLE: u32 = 9;
const MI_INT64: u32 = 12;
const MI_UINT64: u32 = 13;
const MI_MATRIX: u32 = 14;
const MI_COMPRESSED: u32 = 15;

struct Reader<'a> {
    file: &'a str,
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn err(&self, reason: impl Into<String>) -> SensorError {
        SensorError::Input {
            file: self.file.to_string(),
            reason: format!(
                "not a readable MATLAB v5 file: {} (at byte {})",
                reason.into(),
                self.pos
            ),
        }
    }

    fn u32_at(&self, at: usize) -> Result<u32> {
        let b = self
            .data
            .get(at..at + 4)
            .ok_or_else(|| self.err("truncated"))?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Next data element: (type, payload). Handles the small-element form and padding.
    fn element(&mut self) -> Result<(u32, &'a [u8])> {
        let first = self.u32_at(self.pos)?;
        if first >> 16 != 0 {
            let ty = first & 0xffff;
            let size = (first >> 16) as usize;
            if size > 4 {
                return Err(self.err("small element larger than 4 bytes"));
            }
            let start = self.pos + 4;
            let payload = self
                .data
                .get(start..start + size)
                .ok_or_else(|| self.err("truncated"))?;
            self.pos += 8;
            return Ok((ty, payload));
        }
        let size = self.u32_at(self.pos + 4)? as usize;
        let start = self.pos + 8;
        let end = start
            .checked_add(size)
            .ok_or_else(|| self.err("size overflow"))?;
        let payload = self
            .data
            .get(start..end)
            .ok_or_else(|| self.err("element runs past the end of the file"))?;
        self.pos = if first == MI_COMPRESSED {
            end
        } else {
            end.div_ceil(8) * 8
        };
        Ok((first, payload))
    }
}

pub fn parse_mat(file: &str, bytes: &[u8]) -> Result<Vec<MatArray>> {
    let bad = |reason: &str| SensorError::Input {
        file: file.to_string(),
        reason: format!("not a readable MATLAB v5 file: {reason}"),
    };
    if bytes.len() < 128 || !bytes.starts_with(b"MATLAB 5.0") {
        return Err(bad(
            "no 'MATLAB 5.0' header (v7.3 files are HDF5: save with -v7 or -v6)",
        ));
    }
    if &bytes[126..128] != b"IM" {
        return Err(bad("big-endian files are not supported"));
    }
    let mut out = Vec::new();
    read_elements(file, &bytes[128..], &mut out, 0)?;
    Ok(out)
}

fn read_elements(file: &str, data: &[u8], out: &mut Vec<MatArray>, depth: usize) -> Result<()> {
    let mut r = Reader { file, data, pos: 0 };
    while r.pos + 8 <= data.len() {
        let (ty, payload) = r.element()?;
        match ty {
            MI_MATRIX => {
                if let Some(a) = read_matrix(file, payload)? {
                    out.push(a);
                }
            }
            MI_COMPRESSED if depth == 0 => {
                let inflated =
                    miniz_oxide::inflate::decompress_to_vec_zlib(payload).map_err(|e| {
                        SensorError::Input {
                            file: file.to_string(),
                            reason: format!("a compressed variable does not inflate: {e:?}"),
                        }
                    })?;
                read_elements(file, &inflated, out, depth + 1)?;
            }
            _ => {}
        }
    }
    Ok(())
}

fn read_matrix(file: &str, payload: &[u8]) -> Result<Option<MatArray>> {
    let mut r = Reader {
        file,
        data: payload,
        pos: 0,
    };
    if payload.is_empty() {
        return Ok(None);
    }
    let (_, flags) = r.element()?;
    let class = flags.first().copied().unwrap_or(0);
    let complex = flags.get(1).is_some_and(|b| b & 0x08 != 0);
    // Numeric classes: double 6, single 7, int8..uint64 8..15.
    if !(6..=15).contains(&class) {
        return Ok(None);
    }
    let (_, dims_raw) = r.element()?;
    let dims: Vec<usize> = dims_raw
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]).max(0) as usize)
        .collect();
    let (_, name_raw) = r.element()?;
    let name = String::from_utf8_lossy(name_raw)
        .trim_end_matches('\0')
        .to_string();
    let (ty, real) = r.element()?;
    let values = decode(ty, real).ok_or_else(|| SensorError::Input {
        file: file.to_string(),
        reason: format!("variable '{name}' has an unsupported element type {ty}"),
    })?;
    let expected = dims
        .iter()
        .try_fold(1usize, |acc, d| acc.checked_mul(*d))
        .ok_or_else(|| SensorError::Input {
            file: file.to_string(),
            reason: format!("variable '{name}' has impossible dimensions {dims:?}"),
        })?;
    if values.len() != expected {
        return Err(SensorError::Input {
            file: file.to_string(),
            reason: format!(
                "variable '{name}' holds {} values but its dimensions {dims:?} say {expected}",
                values.len()
            ),
        });
    }
    let _ = complex; // the imaginary part, if any, is ignored
    Ok(Some(MatArray { name, dims, values }))
}

fn decode(ty: u32, b: &[u8]) -> Option<Vec<f64>> {
    macro_rules! each {
        ($t:ty, $n:expr) => {
            b.chunks_exact($n)
                .map(|c| {
                    let mut a = [0u8; $n];
                    a.copy_from_slice(c);
                    <$t>::from_le_bytes(a) as f64
                })
                .collect()
        };
    }
    Some(match ty {
        MI_DOUBLE => each!(f64, 8),
        MI_SINGLE => each!(f32, 4),
        MI_INT8 => b.iter().map(|v| f64::from(*v as i8)).collect(),
        MI_UINT8 => b.iter().map(|v| f64::from(*v)).collect(),
        MI_INT16 => each!(i16, 2),
        MI_UINT16 => each!(u16, 2),
        MI_INT32 => each!(i32, 4),
        MI_UINT32 => each!(u32, 4),
        MI_INT64 => each!(i64, 8),
        MI_UINT64 => each!(u64, 8),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a v5 file with one double column vector, optionally zlib-compressed.
    pub(crate) fn write_v5(name: &str, values: &[f64], compress: bool) -> Vec<u8> {
        let mut header = vec![b' '; 128];
        header[..10].copy_from_slice(b"MATLAB 5.0");
        header[124..126].copy_from_slice(&0x0100u16.to_le_bytes());
        header[126..128].copy_from_slice(b"IM");
        let pad = |v: &mut Vec<u8>| {
            while !v.len().is_multiple_of(8) {
                v.push(0);
            }
        };
        let mut m = Vec::new();
        m.extend_from_slice(&MI_UINT32.to_le_bytes());
        m.extend_from_slice(&8u32.to_le_bytes());
        m.extend_from_slice(&[6, 0, 0, 0, 0, 0, 0, 0]);
        m.extend_from_slice(&MI_INT32.to_le_bytes());
        m.extend_from_slice(&8u32.to_le_bytes());
        m.extend_from_slice(&(values.len() as i32).to_le_bytes());
        m.extend_from_slice(&1i32.to_le_bytes());
        m.extend_from_slice(&MI_INT8.to_le_bytes());
        m.extend_from_slice(&(name.len() as u32).to_le_bytes());
        m.extend_from_slice(name.as_bytes());
        pad(&mut m);
        m.extend_from_slice(&MI_DOUBLE.to_le_bytes());
        m.extend_from_slice(&((values.len() * 8) as u32).to_le_bytes());
        for v in values {
            m.extend_from_slice(&v.to_le_bytes());
        }
        let mut el = Vec::new();
        el.extend_from_slice(&MI_MATRIX.to_le_bytes());
        el.extend_from_slice(&(m.len() as u32).to_le_bytes());
        el.extend_from_slice(&m);
        let mut out = header;
        if compress {
            let z = miniz_oxide::deflate::compress_to_vec_zlib(&el, 6);
            out.extend_from_slice(&MI_COMPRESSED.to_le_bytes());
            out.extend_from_slice(&(z.len() as u32).to_le_bytes());
            out.extend_from_slice(&z);
        } else {
            out.extend_from_slice(&el);
        }
        out
    }

    #[test]
    fn reads_plain_and_compressed_doubles() {
        for compress in [false, true] {
            let bytes = write_v5("X097_DE_time", &[0.5, -1.25, 3.0], compress);
            let arrays = parse_mat("t.mat", &bytes).expect("parse");
            let a = find(&arrays, "_DE_time").expect("found");
            assert_eq!(
                (a.name.as_str(), a.dims.as_slice(), a.values.as_slice()),
                ("X097_DE_time", &[3, 1][..], &[0.5, -1.25, 3.0][..])
            );
        }
    }

    #[test]
    fn truncated_and_foreign_files_are_refused_clearly() {
        let bytes = write_v5("x", &[1.0; 16], false);
        let e = parse_mat("t.mat", &bytes[..bytes.len() - 20]).expect_err("truncated");
        assert!(e.to_string().contains("past the end"), "{e}");
        let e = parse_mat("t.mat", b"\x89HDF\r\n").expect_err("hdf5");
        assert!(e.to_string().contains("v7.3"), "{e}");
    }
}
