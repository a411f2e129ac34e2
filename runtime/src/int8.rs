//! Int8 weight storage inside an artifact's NNEF tar.
//!
//! A quantized model (`neoc compile --quantize int8`) computes with weights whose every value
//! is an int8 times a per-channel scale. tract's NNEF writer stores those tensors as f32
//! `.dat` files (and folds any int8 → f32 chain into f32 before writing), so the artifact
//! writer packs each such tensor itself: `NAME.dat` becomes `NAME.dat.q8` holding the original
//! 128-byte NNEF header, the channel axis, one f32 scale per channel and the int8 values —
//! about a quarter of the bytes. Packing is lossless: a tensor is packed only when every value
//! is reproduced exactly (a zero as +0), and [`unpack`] rebuilds the `.dat` before tract reads the
//! graph, so the device computes in f32 with exactly the weights the compiler checked.

use crate::error::{Result, RuntimeError};
use std::borrow::Cow;
use std::io::Read;

/// Suffix of a packed tensor entry in the NNEF tar.
pub const PACKED_SUFFIX: &str = ".q8";
const MAGIC: &[u8; 8] = b"NEOQ8v1\0";
const NNEF_HEADER: usize = 128;
const NO_AXIS: u32 = u32::MAX;

/// One tensor the packer stored as int8.
#[derive(Debug, Clone, PartialEq)]
pub struct Packed {
    pub name: String,
    pub elements: usize,
    /// Axis the scales run along (`None`: one scale for the tensor).
    pub axis: Option<usize>,
    pub f32_bytes: usize,
    pub packed_bytes: usize,
}

fn bad(msg: String) -> RuntimeError {
    RuntimeError::BadManifest(format!("int8 weights: {msg}"))
}

/// Shape and element count an f32 NNEF tensor header announces, or None for anything else
/// (other types, rank 0 or above 8, a count that overflows).
fn f32_header_shape(header: &[u8]) -> Option<(Vec<usize>, usize)> {
    if header.len() < NNEF_HEADER || header[0..2] != [0x4e, 0xef] {
        return None;
    }
    let u32_at =
        |o: usize| u32::from_le_bytes([header[o], header[o + 1], header[o + 2], header[o + 3]]);
    let u16_at = |o: usize| u16::from_le_bytes([header[o], header[o + 1]]);
    let rank = u32_at(8) as usize;
    let (bits, item_type, vendor) = (u32_at(44), u16_at(48), u16_at(50));
    if rank == 0 || rank > 8 || bits != 32 || item_type != 0 || vendor != 0 {
        return None;
    }
    let shape: Vec<usize> = (0..rank).map(|i| u32_at(12 + 4 * i) as usize).collect();
    let n = shape
        .iter()
        .try_fold(1usize, |acc, d| acc.checked_mul(*d))?;
    Some((shape, n))
}

/// Shape of an f32 NNEF tensor file whose size matches its header, or None.
fn f32_dat_shape(dat: &[u8]) -> Option<Vec<usize>> {
    let (shape, n) = f32_header_shape(dat)?;
    (n.checked_mul(4)?.checked_add(NNEF_HEADER)? == dat.len()).then_some(shape)
}

/// Per-channel int8 form of `values` along `axis`, if every value is exactly int8 × scale.
fn exact_int8(values: &[f32], shape: &[usize], axis: Option<usize>) -> Option<(Vec<f32>, Vec<i8>)> {
    let (channels, inner) = match axis {
        Some(a) => (shape[a], shape[a + 1..].iter().product::<usize>()),
        None => (1, values.len()),
    };
    if channels == 0 || inner == 0 {
        return None;
    }
    let channel_of = |i: usize| (i / inner) % channels;
    let mut absmax = vec![0f32; channels];
    for (i, v) in values.iter().enumerate() {
        if !v.is_finite() {
            return None;
        }
        let c = channel_of(i);
        absmax[c] = absmax[c].max(v.abs());
    }
    // The scale the compiler used is absmax/127 give or take the rounding of 127 × scale:
    // try it and its nearest neighbours.
    let mut scales: Vec<f32> = absmax
        .iter()
        .map(|m| if *m > 0.0 { m / 127.0 } else { 1.0 })
        .collect();
    let fits = |v: f32, s: f32| {
        let q = (v / s).round();
        // Value for value; a zero comes back as +0 whatever its sign, which no sum sees.
        q.abs() <= 127.0 && q * s == v
    };
    let mut settled = vec![false; channels];
    for attempt in 0..5 {
        let mut ok = vec![true; channels];
        for (i, v) in values.iter().enumerate() {
            let c = channel_of(i);
            if !settled[c] && ok[c] && !fits(*v, scales[c]) {
                ok[c] = false;
            }
        }
        for c in 0..channels {
            if ok[c] {
                settled[c] = true;
            } else if attempt < 4 {
                // base, +1 ulp, −1 ulp, +2 ulp, −2 ulp
                let base = absmax[c] / 127.0;
                let step = [1i32, -1, 2, -2][attempt];
                scales[c] = f32::from_bits((base.to_bits() as i64 + step as i64) as u32);
            }
        }
        if settled.iter().all(|s| *s) {
            let q = values
                .iter()
                .enumerate()
                .map(|(i, v)| (v / scales[channel_of(i)]).round() as i8)
                .collect();
            return Some((scales, q));
        }
    }
    None
}

fn encode(header: &[u8], axis: Option<usize>, scales: &[f32], q: &[i8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + 8 + NNEF_HEADER + 4 * scales.len() + q.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&axis.map_or(NO_AXIS, |a| a as u32).to_le_bytes());
    out.extend_from_slice(&(scales.len() as u32).to_le_bytes());
    out.extend_from_slice(header);
    for s in scales {
        out.extend_from_slice(&s.to_le_bytes());
    }
    out.extend(q.iter().map(|v| *v as u8));
    out
}

fn decode(name: &str, packed: &[u8]) -> Result<Vec<u8>> {
    let fixed = 8 + 8 + NNEF_HEADER;
    if packed.len() < fixed || &packed[..8] != MAGIC {
        return Err(bad(format!("{name} is not a packed tensor")));
    }
    let u32_at =
        |o: usize| u32::from_le_bytes([packed[o], packed[o + 1], packed[o + 2], packed[o + 3]]);
    let axis = u32_at(8);
    let channels = u32_at(12) as usize;
    let header = &packed[16..fixed];
    let (shape, n) = f32_header_shape(header).ok_or_else(|| bad(format!("{name}: bad header")))?;
    let inner = if axis == NO_AXIS {
        n
    } else {
        let a = axis as usize;
        if a >= shape.len() || shape[a] != channels {
            return Err(bad(format!(
                "{name}: axis {a} does not fit shape {shape:?}"
            )));
        }
        shape[a + 1..].iter().product()
    };
    // The size must match before anything is allocated (a crafted header could announce
    // gigabytes).
    let expected = channels
        .checked_mul(4)
        .and_then(|b| b.checked_add(fixed))
        .and_then(|b| b.checked_add(n));
    if channels == 0 || expected != Some(packed.len()) {
        return Err(bad(format!("{name}: truncated")));
    }
    let scales: Vec<f32> = packed[fixed..fixed + 4 * channels]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let q = &packed[fixed + 4 * channels..];
    let mut dat = Vec::with_capacity(NNEF_HEADER + 4 * n);
    dat.extend_from_slice(header);
    for (i, v) in q.iter().enumerate() {
        let s = scales[(i / inner.max(1)) % channels];
        dat.extend_from_slice(&((*v as i8) as f32 * s + 0.0).to_le_bytes()); // +0, never -0
    }
    Ok(dat)
}

fn tar_entries(origin: &str, tar_bytes: &[u8]) -> Result<Vec<(String, Vec<u8>)>> {
    let mut archive = tar::Archive::new(tar_bytes);
    let mut out = Vec::new();
    let entries = archive
        .entries()
        .map_err(|e| bad(format!("{origin}: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| bad(format!("{origin}: {e}")))?;
        let name = entry
            .path()
            .map_err(|e| bad(format!("{origin}: {e}")))?
            .to_string_lossy()
            .into_owned();
        let mut data = Vec::new();
        entry
            .read_to_end(&mut data)
            .map_err(|e| bad(format!("{origin}: {name}: {e}")))?;
        out.push((name, data));
    }
    Ok(out)
}

fn tar_of(entries: &[(String, Vec<u8>)]) -> Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, data) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(315_532_800);
        header.set_entry_type(tar::EntryType::Regular);
        builder
            .append_data(&mut header, name, data.as_slice())
            .map_err(|e| bad(format!("writing {name}: {e}")))?;
    }
    builder
        .into_inner()
        .map_err(|e| bad(format!("finishing the graph archive: {e}")))
}

/// Packs every f32 tensor of at least `min_elements` values that is exactly int8 × scales
/// (per channel on some axis, or one scale); other files are copied unchanged.
pub fn pack(nnef_tar: &[u8], min_elements: usize) -> Result<(Vec<u8>, Vec<Packed>)> {
    let mut entries = tar_entries("the NNEF graph", nnef_tar)?;
    let mut packed = Vec::new();
    for (name, data) in entries.iter_mut() {
        if !name.ends_with(".dat") {
            continue;
        }
        let Some(shape) = f32_dat_shape(data) else {
            continue;
        };
        let n: usize = shape.iter().product();
        if n < min_elements {
            continue;
        }
        let values: Vec<f32> = data[NNEF_HEADER..]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let axes = (0..shape.len()).map(Some).chain([None]);
        let found = axes
            .filter_map(|a| exact_int8(&values, &shape, a).map(|(s, q)| (a, s, q)))
            .next();
        if let Some((axis, scales, q)) = found {
            let bytes = encode(&data[..NNEF_HEADER], axis, &scales, &q);
            packed.push(Packed {
                name: name.clone(),
                elements: n,
                axis,
                f32_bytes: data.len(),
                packed_bytes: bytes.len(),
            });
            *data = bytes;
            name.push_str(PACKED_SUFFIX);
        }
    }
    Ok((tar_of(&entries)?, packed))
}

/// The NNEF tar with every packed tensor rebuilt as its f32 `.dat` (borrowed unchanged when
/// nothing is packed).
pub fn unpack(tar_bytes: &[u8]) -> Result<Cow<'_, [u8]>> {
    // Names first (headers only, no data copied): every load of an f32 artifact passes here.
    let mut names = Vec::new();
    let mut archive = tar::Archive::new(tar_bytes);
    for entry in archive
        .entries()
        .map_err(|e| bad(format!("the NNEF graph: {e}")))?
    {
        let entry = entry.map_err(|e| bad(format!("the NNEF graph: {e}")))?;
        let path = entry
            .path()
            .map_err(|e| bad(format!("the NNEF graph: {e}")))?;
        names.push(path.to_string_lossy().into_owned());
    }
    if !names.iter().any(|n| n.ends_with(PACKED_SUFFIX)) {
        return Ok(Cow::Borrowed(tar_bytes));
    }
    let plain: std::collections::HashSet<&str> = names.iter().map(String::as_str).collect();
    if let Some(dup) = names.iter().find(|n| {
        n.strip_suffix(PACKED_SUFFIX)
            .is_some_and(|base| plain.contains(base))
    }) {
        return Err(bad(format!("{dup} and its unpacked form are both present")));
    }
    let rebuilt = tar_entries("the NNEF graph", tar_bytes)?
        .into_iter()
        .map(|(name, data)| match name.strip_suffix(PACKED_SUFFIX) {
            Some(base) => Ok((base.to_string(), decode(&name, &data)?)),
            None => Ok((name, data)),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Cow::Owned(tar_of(&rebuilt)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dat(shape: &[usize], values: &[f32]) -> Vec<u8> {
        let mut h = vec![0u8; NNEF_HEADER];
        h[0] = 0x4e;
        h[1] = 0xef;
        h[2] = 1;
        h[4..8].copy_from_slice(&((values.len() * 4) as u32).to_le_bytes());
        h[8..12].copy_from_slice(&(shape.len() as u32).to_le_bytes());
        for (i, d) in shape.iter().enumerate() {
            h[12 + 4 * i..16 + 4 * i].copy_from_slice(&(*d as u32).to_le_bytes());
        }
        h[44..48].copy_from_slice(&32u32.to_le_bytes());
        for v in values {
            h.extend_from_slice(&v.to_le_bytes());
        }
        h
    }

    #[test]
    fn int8_valued_tensors_pack_losslessly_and_others_stay() {
        // Channel scales as the compiler makes them (absmax / 127), values int8 × scale.
        let scales = [0.013f32 / 127.0, 2.5 / 127.0, 1.0 / 127.0];
        let mut q: Vec<i8> = (0..3 * 40)
            .map(|i| (((i * 37) % 255) - 127) as i8)
            .collect();
        for c in 0..3 {
            q[c * 40 + 1] = if c == 1 { 127 } else { -127 }; // each channel's extreme
        }
        let int8_valued: Vec<f32> = q
            .iter()
            .enumerate()
            .map(|(i, v)| *v as f32 * scales[i / 40])
            .collect();
        let plain: Vec<f32> = (0..120).map(|i| (i as f32).sin()).collect();
        let tar = tar_of(&[
            ("graph.nnef".into(), b"version 1.0;".to_vec()),
            ("w.dat".into(), dat(&[3, 40], &int8_valued)),
            ("b.dat".into(), dat(&[120], &plain)),
        ])
        .unwrap();
        let (packed_tar, packed) = pack(&tar, 64).unwrap();
        assert_eq!(packed.len(), 1, "{packed:?}");
        assert_eq!(packed[0].name, "w.dat");
        assert_eq!(packed[0].axis, Some(0));
        assert!(packed[0].packed_bytes < packed[0].f32_bytes / 2);
        assert!(packed_tar.len() < tar.len());
        let restored = unpack(&packed_tar).unwrap();
        assert_eq!(
            tar_entries("t", &restored).unwrap(),
            tar_entries("t", &tar).unwrap(),
            "exact round trip"
        );
        // Nothing packed: unpack borrows.
        assert!(matches!(unpack(&tar).unwrap(), Cow::Borrowed(_)));
    }

    #[test]
    fn a_crafted_header_cannot_ask_for_gigabytes() {
        let mut header = vec![0u8; NNEF_HEADER];
        header[0] = 0x4e;
        header[1] = 0xef;
        header[8..12].copy_from_slice(&1u32.to_le_bytes());
        header[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        header[44..48].copy_from_slice(&32u32.to_le_bytes());
        let entry = encode(&header, None, &[1.0], &[1, 2, 3]);
        let err = decode("w.dat.q8", &entry).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
        // Rank 8 of huge dims: the element count overflows and is refused as a bad header.
        header[8..12].copy_from_slice(&8u32.to_le_bytes());
        for i in 0..8 {
            header[12 + 4 * i..16 + 4 * i].copy_from_slice(&u32::MAX.to_le_bytes());
        }
        let entry = encode(&header, None, &[1.0], &[1]);
        assert!(decode("w.dat.q8", &entry)
            .unwrap_err()
            .to_string()
            .contains("bad header"));
    }

    #[test]
    fn a_damaged_packed_tensor_is_an_error() {
        let values: Vec<f32> = (0..100)
            .map(|i| (((i * 5) % 255) as f32 - 127.0) * 0.5)
            .collect();
        let tar = tar_of(&[("w.dat".into(), dat(&[100], &values))]).unwrap();
        let (packed_tar, packed) = pack(&tar, 64).unwrap();
        assert_eq!(packed.len(), 1);
        let mut entries = tar_entries("t", &packed_tar).unwrap();
        entries[0].1.truncate(150);
        let broken = tar_of(&entries).unwrap();
        let err = unpack(&broken).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
    }
}
