//! The `.neo` container: a plain tar archive (inspect it with `tar tvf`) holding
//!
//! - `manifest.json`: the [`Manifest`], including the sha256 and size of every other file;
//! - `manifest.sha256`: the sha256 of `manifest.json`;
//! - the files the manifest lists (for now `model.nnef.tar`, tract's NNEF form of the graph).
//!
//! Reading checks, in this order: the tar structure (header checksums, and that every byte
//! outside headers and file data is zero, so no byte of the file goes unchecked), the format
//! version, the manifest's hash, then every listed file's hash and size; files the manifest
//! does not list are refused.

use crate::error::{Result, RuntimeError};
use crate::manifest::{FileEntry, Manifest, FORMAT_VERSION, MIN_FORMAT_VERSION};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{Cursor, Read};
use std::path::Path;

pub const MANIFEST_FILE: &str = "manifest.json";
pub const MANIFEST_HASH_FILE: &str = "manifest.sha256";
pub const MODEL_FILE: &str = "model.nnef.tar";

const BLOCK: usize = 512;

/// Hex sha256 of a byte slice.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A verified artifact in memory: its manifest and its files.
#[derive(Debug, Clone)]
pub struct Artifact {
    pub manifest: Manifest,
    files: BTreeMap<String, Vec<u8>>,
}

impl Artifact {
    /// Builds an artifact from a manifest and its files; fills `manifest.files` with their
    /// hashes and sizes.
    pub fn new(mut manifest: Manifest, files: BTreeMap<String, Vec<u8>>) -> Result<Self> {
        for reserved in [MANIFEST_FILE, MANIFEST_HASH_FILE] {
            if files.contains_key(reserved) {
                return Err(RuntimeError::BadManifest(format!(
                    "'{reserved}' is a reserved name"
                )));
            }
        }
        manifest.files = files
            .iter()
            .map(|(name, data)| {
                (
                    name.clone(),
                    FileEntry {
                        sha256: sha256_hex(data),
                        bytes: data.len() as u64,
                    },
                )
            })
            .collect();
        Ok(Artifact { manifest, files })
    }

    /// A file inside the artifact.
    pub fn file(&self, name: &str) -> Option<&[u8]> {
        self.files.get(name).map(Vec::as_slice)
    }

    pub fn file_names(&self) -> impl Iterator<Item = &str> {
        self.files.keys().map(String::as_str)
    }

    /// Serializes to the `.neo` tar form. Deterministic: same inputs, same bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let manifest = serde_json::to_vec_pretty(&self.manifest)
            .map_err(|e| RuntimeError::BadManifest(e.to_string()))?;
        let hash = format!("{}\n", sha256_hex(&manifest));
        let mut builder = tar::Builder::new(Vec::new());
        let mut append = |name: &str, data: &[u8]| -> Result<()> {
            let mut header = tar::Header::new_ustar();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_mtime(315_532_800); // 1980-01-01: reproducible output
            header.set_entry_type(tar::EntryType::Regular);
            builder
                .append_data(&mut header, name, data)
                .map_err(|e| RuntimeError::Model(format!("writing {name} into the artifact: {e}")))
        };
        append(MANIFEST_FILE, &manifest)?;
        append(MANIFEST_HASH_FILE, hash.as_bytes())?;
        for (name, data) in &self.files {
            append(name, data)?;
        }
        builder
            .into_inner()
            .map_err(|e| RuntimeError::Model(format!("finishing the artifact: {e}")))
    }

    /// Writes the artifact to a file (through a temporary file and a rename, so a crash never
    /// leaves a half-written artifact under the final name).
    pub fn write(&self, path: &Path) -> Result<()> {
        let bytes = self.to_bytes()?;
        let io = |source| RuntimeError::Io {
            path: path.to_path_buf(),
            source,
        };
        let tmp = path.with_extension("neo.partial");
        std::fs::write(&tmp, &bytes).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// Reads and verifies an artifact file.
    pub fn open(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| RuntimeError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(&path.display().to_string(), &bytes)
    }

    /// Verifies and parses an artifact held in memory. `origin` names it in errors.
    pub fn from_bytes(origin: &str, bytes: &[u8]) -> Result<Self> {
        let mut entries = read_tar(origin, bytes)?;

        let manifest_bytes = entries.remove(MANIFEST_FILE).ok_or_else(|| {
            RuntimeError::NotAnArtifact(origin.to_string(), format!("no {MANIFEST_FILE} inside"))
        })?;

        // The format version first: a newer artifact may differ in everything else.
        #[derive(serde::Deserialize)]
        struct VersionOnly {
            format_version: u32,
        }
        let version: VersionOnly = serde_json::from_slice(&manifest_bytes).map_err(|e| {
            RuntimeError::Corrupt(format!("{MANIFEST_FILE} is not readable JSON ({e})"))
        })?;
        if version.format_version > FORMAT_VERSION {
            return Err(RuntimeError::NewerFormat {
                found: version.format_version,
                supported: FORMAT_VERSION,
            });
        }
        if version.format_version < MIN_FORMAT_VERSION {
            return Err(RuntimeError::OlderFormat {
                found: version.format_version,
                supported: MIN_FORMAT_VERSION,
            });
        }

        let stated = entries
            .remove(MANIFEST_HASH_FILE)
            .ok_or_else(|| RuntimeError::Corrupt(format!("{MANIFEST_HASH_FILE} is missing")))?;
        let stated = String::from_utf8_lossy(&stated).trim().to_string();
        if stated != sha256_hex(&manifest_bytes) {
            return Err(RuntimeError::Corrupt(format!(
                "{MANIFEST_FILE} does not match its sha256"
            )));
        }
        let manifest: Manifest = serde_json::from_slice(&manifest_bytes)
            .map_err(|e| RuntimeError::BadManifest(e.to_string()))?;

        for (name, entry) in &manifest.files {
            let data = entries
                .get(name)
                .ok_or_else(|| RuntimeError::Corrupt(format!("{name} is listed but missing")))?;
            if data.len() as u64 != entry.bytes || sha256_hex(data) != entry.sha256 {
                return Err(RuntimeError::Corrupt(format!(
                    "{name} does not match its sha256"
                )));
            }
        }
        if let Some(extra) = entries.keys().find(|k| !manifest.files.contains_key(*k)) {
            return Err(RuntimeError::Corrupt(format!(
                "{extra} is not listed in the manifest"
            )));
        }
        Ok(Artifact {
            manifest,
            files: entries,
        })
    }
}

/// Reads every regular file of a tar archive, checking that no byte outside the headers and
/// file contents is set (tar padding and the end-of-archive blocks must be zero).
fn read_tar(origin: &str, bytes: &[u8]) -> Result<BTreeMap<String, Vec<u8>>> {
    let not_artifact = |why: String| RuntimeError::NotAnArtifact(origin.to_string(), why);
    if bytes.len() < 3 * BLOCK || !bytes.len().is_multiple_of(BLOCK) {
        return Err(not_artifact(format!(
            "{} bytes is not a whole tar archive (truncated?)",
            bytes.len()
        )));
    }
    let mut covered = vec![false; bytes.len() / BLOCK];
    let mut files = BTreeMap::new();
    let mut archive = tar::Archive::new(Cursor::new(bytes));
    let entries = archive.entries().map_err(|e| not_artifact(e.to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| RuntimeError::Corrupt(format!("tar structure: {e}")))?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            return Err(RuntimeError::Corrupt("unexpected non-file entry".into()));
        }
        let name = entry
            .path()
            .map_err(|e| RuntimeError::Corrupt(format!("entry name: {e}")))?
            .to_string_lossy()
            .into_owned();
        let header_at = entry.raw_header_position() as usize;
        let data_at = entry.raw_file_position() as usize;
        let size = entry.size() as usize;
        // The only header we write is a single ustar block directly before the data.
        if data_at != header_at + BLOCK {
            return Err(RuntimeError::Corrupt(format!(
                "{name}: unexpected extended header"
            )));
        }
        let mut data = Vec::with_capacity(size);
        entry
            .read_to_end(&mut data)
            .map_err(|e| RuntimeError::Corrupt(format!("{name}: {e}")))?;
        if data.len() != size {
            return Err(RuntimeError::Corrupt(format!("{name}: truncated")));
        }
        let first = header_at / BLOCK;
        let last = (data_at + size).div_ceil(BLOCK);
        for block in covered.iter_mut().take(last).skip(first) {
            *block = true;
        }
        // Padding after the data, inside its last block, must be zero.
        if bytes[data_at + size..last * BLOCK].iter().any(|b| *b != 0) {
            return Err(RuntimeError::Corrupt(format!(
                "{name}: non-zero tar padding"
            )));
        }
        if files.insert(name.clone(), data).is_some() {
            return Err(RuntimeError::Corrupt(format!("{name} appears twice")));
        }
    }
    if files.is_empty() {
        return Err(not_artifact("no files inside".into()));
    }
    // A complete archive ends with two zero blocks after its last file.
    let end = covered.iter().rposition(|c| *c).map_or(0, |i| i + 1);
    if covered.len() < end + 2 {
        return Err(RuntimeError::Corrupt(
            "the archive is truncated (no end blocks)".into(),
        ));
    }
    for (i, seen) in covered.iter().enumerate() {
        if !seen && bytes[i * BLOCK..(i + 1) * BLOCK].iter().any(|b| *b != 0) {
            return Err(RuntimeError::Corrupt(format!(
                "unexpected data at byte {} outside any file",
                i * BLOCK
            )));
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::*;

    pub(crate) fn sample_manifest() -> Manifest {
        Manifest {
            format_version: FORMAT_VERSION,
            name: "t".into(),
            compiler: CompilerInfo {
                name: "neoc".into(),
                version: "0".into(),
                tract_version: "0".into(),
            },
            source: SourceInfo {
                file: "m.onnx".into(),
                format: "onnx".into(),
                sha256: "00".into(),
                bytes: 1,
            },
            target: TargetInfo {
                board: "x86_64".into(),
                triple: "x86_64-unknown-linux-gnu".into(),
                cpu: "x86-64-v3".into(),
                precision: "f32".into(),
                threads: 1,
                memory_budget_mb: 1,
            },
            inputs: vec![],
            outputs: vec![],
            files: BTreeMap::new(),
            anomaly: None,
            sensor: None,
            quantization: None,
        }
    }

    fn sample() -> Vec<u8> {
        let files = BTreeMap::from([
            ("model.nnef.tar".to_string(), vec![7u8; 1000]),
            ("labels.txt".to_string(), b"a\nb\n".to_vec()),
        ]);
        Artifact::new(sample_manifest(), files)
            .unwrap()
            .to_bytes()
            .unwrap()
    }

    #[test]
    fn round_trips_and_is_deterministic() {
        let bytes = sample();
        assert_eq!(bytes, sample());
        let a = Artifact::from_bytes("x", &bytes).unwrap();
        assert_eq!(a.file("labels.txt"), Some(&b"a\nb\n"[..]));
        assert_eq!(a.manifest.files["model.nnef.tar"].bytes, 1000);
    }

    #[test]
    fn every_single_byte_change_is_detected() {
        let bytes = sample();
        // Flip each byte in turn (step 7 keeps the test quick but hits headers, data,
        // padding and the end blocks).
        for i in (0..bytes.len()).step_by(7) {
            let mut bad = bytes.clone();
            bad[i] ^= 0x20;
            assert!(
                Artifact::from_bytes("x", &bad).is_err(),
                "flip at byte {i} went unnoticed"
            );
        }
    }

    #[test]
    fn truncation_and_garbage_are_refused() {
        let bytes = sample();
        for cut in [512, 1024, 1536, bytes.len() / 2] {
            let err = Artifact::from_bytes("x", &bytes[..bytes.len() - cut]).unwrap_err();
            assert!(
                matches!(
                    err,
                    RuntimeError::Corrupt(_) | RuntimeError::NotAnArtifact(..)
                ),
                "cut {cut}: {err}"
            );
        }
        let err = Artifact::from_bytes("x", b"hello").unwrap_err();
        assert!(err.to_string().contains("not a neo artifact"), "{err}");
    }

    #[test]
    fn newer_format_is_refused_with_the_versions() {
        let mut m = sample_manifest();
        m.format_version = FORMAT_VERSION + 1;
        let bytes = Artifact::new(m, BTreeMap::new())
            .unwrap()
            .to_bytes()
            .unwrap();
        let err = Artifact::from_bytes("x", &bytes).unwrap_err();
        assert!(
            matches!(err, RuntimeError::NewerFormat { found, .. } if found == FORMAT_VERSION + 1)
        );
        assert!(err.to_string().contains("update the device runtime"));
    }
}
