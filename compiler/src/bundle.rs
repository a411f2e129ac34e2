//! `neoc bundle`: everything a board needs to boot into the station daemon, in one tar:
//! the cross-built `neo-gateway`, the compiled models and the recordings/frames the station
//! file names, the station file rewritten to the installed paths, a systemd unit (already
//! enabled), an install script and a manifest of hashes.
//!
//! ```text
//! opt/neo/bin/neo-gateway            opt/neo/models/*.neo     opt/neo/data/...
//! opt/neo/install.sh                 opt/neo/BUNDLE.json      opt/neo/SHA256SUMS
//! etc/neo/station.toml               etc/systemd/system/neo-gateway.service
//! etc/systemd/system/multi-user.target.wants/neo-gateway.service -> ../neo-gateway.service
//! ```

use crate::error::{CompileError, Result};
use neo_boards::Boards;
use neo_runtime::artifact::sha256_hex;
use neo_runtime::Artifact;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Version of the bundle layout and of `BUNDLE.json`.
pub const BUNDLE_VERSION: u32 = 1;

#[derive(Debug, Clone)]
pub struct BundleOptions {
    pub board: String,
    /// The station file to ship (relative paths in it are from its folder).
    pub config: PathBuf,
    /// The daemon built for the board [default: target/cross/<triple>/release/neo-gateway].
    pub daemon: Option<PathBuf>,
    pub output: PathBuf,
    /// Strip the daemon's symbols with the board's `strip` (`aarch64-linux-gnu-strip` …)
    /// when that tool is installed.
    pub strip: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct BundleManifest {
    pub bundle_version: u32,
    pub board: String,
    pub triple: String,
    pub neoc_version: String,
    /// Whether the daemon's symbols were stripped (and with which tool).
    pub stripped_with: Option<String>,
    /// Every file in the bundle (not the manifest itself): sha256 and size.
    pub files: BTreeMap<String, FileHash>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FileHash {
    pub sha256: String,
    pub bytes: u64,
}

fn bad(m: impl Into<String>) -> CompileError {
    CompileError::Options(m.into())
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| CompileError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// ELF machine numbers of the triples' architectures.
fn elf_machine(triple: &str) -> Option<u16> {
    match triple.split('-').next()? {
        "x86_64" => Some(62),
        "aarch64" => Some(183),
        a if a.starts_with("arm") => Some(40),
        "riscv64gc" | "riscv64" => Some(243),
        _ => None,
    }
}

fn check_daemon(path: &Path, bytes: &[u8], triple: &str) -> Result<()> {
    if bytes.len() < 20 || &bytes[..4] != b"\x7fELF" {
        return Err(bad(format!("{} is not an ELF executable", path.display())));
    }
    let machine = u16::from_le_bytes([bytes[18], bytes[19]]);
    match elf_machine(triple) {
        Some(m) if m != machine => Err(bad(format!(
            "{} is built for another CPU (ELF machine {machine}) than the board's {triple}: build it with scripts/cross.sh {triple} build",
            path.display()
        ))),
        _ => Ok(()),
    }
}

/// The stripped daemon and the tool used, when the board's strip tool is installed.
fn strip(daemon: &Path, triple: &str, output: &Path) -> Option<(Vec<u8>, String)> {
    let mut parts = triple.split('-');
    let arch = parts.next()?;
    let tool = match (arch, triple.ends_with("gnueabihf")) {
        ("x86_64", _) => "strip".to_string(),
        (a, _) if a.starts_with("riscv64") => "riscv64-linux-gnu-strip".to_string(),
        (a, true) if a.starts_with("arm") => "arm-linux-gnueabihf-strip".to_string(),
        (a, _) => format!("{a}-linux-gnu-strip"),
    };
    let tmp = output.with_extension("daemon.stripped");
    let ok = std::process::Command::new(&tool)
        .arg("-o")
        .arg(&tmp)
        .arg(daemon)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let bytes = ok.then(|| std::fs::read(&tmp).ok()).flatten();
    let _ = std::fs::remove_file(&tmp);
    bytes.map(|b| (b, tool))
}

struct Files {
    files: BTreeMap<String, (Vec<u8>, u32)>,
}

impl Files {
    fn add(&mut self, name: String, data: Vec<u8>, mode: u32) -> Result<()> {
        if self.files.contains_key(&name) {
            return Err(bad(format!(
                "two files would be installed as /{name}: give them different names"
            )));
        }
        self.files.insert(name, (data, mode));
        Ok(())
    }

    fn get(&self, name: &str) -> Option<&Vec<u8>> {
        self.files.get(name).map(|(data, _)| data)
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Builds the bundle; returns its manifest.
pub fn bundle(opts: &BundleOptions, boards: &Boards) -> Result<BundleManifest> {
    let board = boards.get(&opts.board)?;
    let base = opts
        .config
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let resolve = |p: &str| {
        let p = Path::new(p);
        if p.is_relative() {
            base.join(p)
        } else {
            p.to_path_buf()
        }
    };
    let text = String::from_utf8(read(&opts.config)?)
        .map_err(|_| bad(format!("{} is not UTF-8 text", opts.config.display())))?;
    let mut station: toml::Table = text
        .parse()
        .map_err(|e| bad(format!("{}: {e}", opts.config.display())))?;
    let mut files = Files {
        files: BTreeMap::new(),
    };

    // The daemon.
    let daemon = opts.daemon.clone().unwrap_or_else(|| {
        PathBuf::from(format!("target/cross/{}/release/neo-gateway", board.triple))
    });
    if !daemon.exists() {
        return Err(bad(format!(
            "no daemon at {}: build it with `scripts/cross.sh {} build`, or give --daemon PATH",
            daemon.display(),
            board.triple
        )));
    }
    let mut bytes = read(&daemon)?;
    check_daemon(&daemon, &bytes, &board.triple)?;
    let stripped_with = if opts.strip {
        strip(&daemon, &board.triple, &opts.output).map(|(b, tool)| {
            bytes = b;
            tool
        })
    } else {
        None
    };
    files.add("opt/neo/bin/neo-gateway".into(), bytes, 0o755)?;

    // Models: checked, and vision models must be compiled for this board's triple.
    let add_model = |key: &str, value: &mut toml::Value, files: &mut Files| -> Result<()> {
        let Some(p) = value.as_str() else {
            return Err(bad(format!("{key} must be a path")));
        };
        let path = resolve(p);
        let artifact =
            Artifact::open(&path).map_err(|e| bad(format!("{key} = {}: {e}", path.display())))?;
        let m = &artifact.manifest;
        if m.sensor.is_none() && m.target.triple != board.triple {
            return Err(bad(format!(
                "{key} = {}: compiled for {} ({}), the board is {} ({}): recompile with `neoc compile ... --target {}`",
                path.display(),
                m.target.board,
                m.target.triple,
                board.name,
                board.triple,
                board.name
            )));
        }
        let name = format!("opt/neo/models/{}", file_name(&path));
        files.add(name.clone(), read(&path)?, 0o644)?;
        *value = toml::Value::String(format!("/{name}"));
        Ok(())
    };
    if let Some(v) = station
        .get_mut("inspection")
        .and_then(|i| i.get_mut("model"))
    {
        add_model("inspection.model", v, &mut files)?;
    }
    let data_file =
        |key: &str, prefix: &str, value: &mut toml::Value, files: &mut Files| -> Result<()> {
            let Some(p) = value.as_str() else {
                return Err(bad(format!("{key} must be a path")));
            };
            let path = resolve(p);
            if path.is_dir() {
                // A folder of frames: every file in it.
                let mut entries: Vec<PathBuf> = std::fs::read_dir(&path)
                    .map_err(|source| CompileError::Io {
                        path: path.clone(),
                        source,
                    })?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.is_file())
                    .collect();
                entries.sort();
                for e in entries {
                    files.add(
                        format!("opt/neo/data/{prefix}/{}", file_name(&e)),
                        read(&e)?,
                        0o644,
                    )?;
                }
                *value = toml::Value::String(format!("/opt/neo/data/{prefix}"));
            } else if path.is_file() {
                let name = format!("opt/neo/data/{prefix}/{}", file_name(&path));
                files.add(name.clone(), read(&path)?, 0o644)?;
                *value = toml::Value::String(format!("/{name}"));
            } else {
                return Err(bad(format!(
                    "{key} = {}: no such file or folder (globs are not bundled: give a folder)",
                    path.display()
                )));
            }
            Ok(())
        };
    if let Some(toml::Value::Array(sensors)) = station.get_mut("sensors") {
        for (i, s) in sensors.iter_mut().enumerate() {
            let name = s
                .get("name")
                .and_then(|n| n.as_str())
                .unwrap_or("sensor")
                .to_string();
            if let Some(v) = s.get_mut("model") {
                add_model(&format!("sensors[{i}].model"), v, &mut files)?;
            }
            if let Some(v) = s.get_mut("path") {
                data_file(
                    &format!("sensors[{i}].path"),
                    &format!("sensor-{name}"),
                    v,
                    &mut files,
                )?;
            }
        }
    }
    if let Some(toml::Value::Array(cams)) = station.get_mut("cameras") {
        for (i, c) in cams.iter_mut().enumerate() {
            let kind = c
                .get("kind")
                .and_then(|k| k.as_str())
                .unwrap_or("folder")
                .to_string();
            let name = c
                .get("name")
                .and_then(|n| n.as_str())
                .unwrap_or("camera")
                .to_string();
            if kind == "folder" {
                if let Some(v) = c.get_mut("path") {
                    data_file(
                        &format!("cameras[{i}].path"),
                        &format!("camera-{name}"),
                        v,
                        &mut files,
                    )?;
                }
            }
        }
    }
    // TLS material for the broker: shipped under /etc/neo/tls.
    if let Some(tls) = station
        .get_mut("mqtt")
        .and_then(|m| m.get_mut("tls"))
        .and_then(|t| t.as_table_mut())
    {
        for key in ["ca", "cert", "key"] {
            if let Some(v) = tls.get_mut(key) {
                let Some(p) = v.as_str() else {
                    return Err(bad(format!("mqtt.tls.{key} must be a path")));
                };
                let path = resolve(p);
                let name = format!("etc/neo/tls/{}", file_name(&path));
                files.add(name.clone(), read(&path)?, 0o600)?;
                *v = toml::Value::String(format!("/{name}"));
            }
        }
    }
    // The update server's CA for deployments by https URL: shipped beside the broker's.
    if let Some(v) = station
        .get_mut("commands")
        .and_then(|c| c.get_mut("url_ca"))
    {
        let Some(p) = v.as_str() else {
            return Err(bad("commands.url_ca must be a path"));
        };
        let path = resolve(p);
        let name = format!("etc/neo/tls/{}", file_name(&path));
        let bytes = read(&path)?;
        // Often the plant's one CA, already shipped as mqtt.tls.ca.
        if files.get(&name) != Some(&bytes) {
            files.add(name.clone(), bytes, 0o644)?;
        }
        *v = toml::Value::String(format!("/{name}"));
    }
    // State lives under /var/lib/neo on the board.
    let set = |station: &mut toml::Table, table: &str, key: &str, value: &str| {
        if let Some(t) = station.get_mut(table).and_then(|t| t.as_table_mut()) {
            if t.contains_key(key) || key == "dir" || key == "models_dir" {
                t.insert(key.into(), toml::Value::String(value.into()));
            }
        }
    };
    set(&mut station, "spool", "dir", "/var/lib/neo/spool");
    if !station.contains_key("commands") {
        station.insert("commands".into(), toml::Value::Table(toml::Table::new()));
    }
    set(
        &mut station,
        "commands",
        "models_dir",
        "/var/lib/neo/models",
    );
    set(&mut station, "reject", "path", "/var/lib/neo/rejects.jsonl");
    let config_text = format!(
        "# Generated by `neoc bundle --board {}` from {} (paths rewritten to the installed ones).\n{}",
        board.name,
        file_name(&opts.config),
        toml::to_string_pretty(&station).map_err(|e| bad(format!("writing the station file: {e}")))?
    );
    files.add(
        "etc/neo/station.toml".into(),
        config_text.into_bytes(),
        0o644,
    )?;
    files.add(
        "etc/systemd/system/neo-gateway.service".into(),
        SERVICE.as_bytes().to_vec(),
        0o644,
    )?;
    files.add(
        "opt/neo/install.sh".into(),
        INSTALL.as_bytes().to_vec(),
        0o755,
    )?;

    // Hashes: SHA256SUMS for `sha256sum -c` on the board, BUNDLE.json for programs.
    let mut sums = String::new();
    let mut hashes = BTreeMap::new();
    for (name, (data, _)) in &files.files {
        let h = sha256_hex(data);
        sums.push_str(&format!("{h}  {name}\n"));
        hashes.insert(
            name.clone(),
            FileHash {
                sha256: h,
                bytes: data.len() as u64,
            },
        );
    }
    let manifest = BundleManifest {
        bundle_version: BUNDLE_VERSION,
        board: board.name.clone(),
        triple: board.triple.clone(),
        neoc_version: env!("CARGO_PKG_VERSION").into(),
        stripped_with,
        files: hashes,
    };
    files.add("opt/neo/SHA256SUMS".into(), sums.into_bytes(), 0o644)?;
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| bad(e.to_string()))?;
    files.add("opt/neo/BUNDLE.json".into(), json, 0o644)?;

    // The tar: deterministic (fixed mtime, sorted names), directories implied.
    let mut builder = tar::Builder::new(Vec::new());
    let io = |e: std::io::Error| CompileError::Io {
        path: opts.output.clone(),
        source: e,
    };
    for (name, (data, mode)) in &files.files {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(*mode);
        header.set_mtime(315_532_800);
        header.set_entry_type(tar::EntryType::Regular);
        builder
            .append_data(&mut header, name, data.as_slice())
            .map_err(io)?;
    }
    let mut link = tar::Header::new_gnu();
    link.set_entry_type(tar::EntryType::Symlink);
    link.set_size(0);
    link.set_mode(0o777);
    link.set_mtime(315_532_800);
    builder
        .append_link(
            &mut link,
            "etc/systemd/system/multi-user.target.wants/neo-gateway.service",
            "../neo-gateway.service",
        )
        .map_err(io)?;
    let bytes = builder.into_inner().map_err(io)?;
    let tmp = opts.output.with_extension("partial");
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, &opts.output).map_err(io)?;
    Ok(manifest)
}

const SERVICE: &str = "[Unit]
Description=neo station daemon (inspection, sensors, MQTT)
After=network-online.target
Wants=network-online.target

[Service]
# The daemon says READY=1 once its station runs and pings the watchdog while its stages make
# progress; three stalls in a row (station.stall_s each) stop the pings and systemd restarts it.
Type=notify
NotifyAccess=main
WatchdogSec=60
TimeoutStartSec=120
ExecStart=/opt/neo/bin/neo-gateway run --quiet --config /etc/neo/station.toml
WorkingDirectory=/var/lib/neo
StateDirectory=neo
Restart=always
RestartSec=2
# SIGTERM drains the queues and flushes the spool; give it time.
TimeoutStopSec=30

[Install]
WantedBy=multi-user.target
";

const INSTALL: &str = r#"#!/bin/sh
# Installs this neo bundle into ROOT (default /): the station daemon as a systemd service that
# starts at boot. Run from the unpacked bundle:  sh opt/neo/install.sh [ROOT]
# Checks every file's sha256 first; an existing /etc/neo/station.toml is kept (the new one is
# written beside it as station.toml.new).
set -eu
ROOT=${1:-/}
HERE=$(cd "$(dirname "$0")/../.." && pwd)
cd "$HERE"
if command -v sha256sum >/dev/null 2>&1; then
  sha256sum -c --quiet opt/neo/SHA256SUMS || { echo "error: the bundle is corrupt (sha256 mismatch): copy it again" >&2; exit 1; }
fi
mkdir -p "$ROOT/opt/neo/bin" "$ROOT/etc/neo" "$ROOT/etc/systemd/system/multi-user.target.wants" \
         "$ROOT/var/lib/neo/spool" "$ROOT/var/lib/neo/models"
# The daemon may be running (an upgrade): write beside it and rename over it (a running
# binary cannot be overwritten in place), then the rest.
cp opt/neo/bin/neo-gateway "$ROOT/opt/neo/bin/neo-gateway.new"
chmod 755 "$ROOT/opt/neo/bin/neo-gateway.new"
mv -f "$ROOT/opt/neo/bin/neo-gateway.new" "$ROOT/opt/neo/bin/neo-gateway"
for f in opt/neo/*; do
  [ "$f" = opt/neo/bin ] || cp -R "$f" "$ROOT/opt/neo/"
done
chmod 755 "$ROOT/opt/neo/install.sh"
if [ -d etc/neo/tls ]; then mkdir -p "$ROOT/etc/neo/tls" && cp etc/neo/tls/* "$ROOT/etc/neo/tls/" && chmod 600 "$ROOT/etc/neo/tls/"*; fi
if [ -e "$ROOT/etc/neo/station.toml" ]; then
  cp etc/neo/station.toml "$ROOT/etc/neo/station.toml.new"
  echo "kept the existing /etc/neo/station.toml; the bundle's is /etc/neo/station.toml.new"
else
  cp etc/neo/station.toml "$ROOT/etc/neo/station.toml"
fi
cp etc/systemd/system/neo-gateway.service "$ROOT/etc/systemd/system/neo-gateway.service"
ln -sf ../neo-gateway.service "$ROOT/etc/systemd/system/multi-user.target.wants/neo-gateway.service"
# Installing onto the running system: pick up the new unit and restart the daemon.
if [ "$ROOT" = / ] && command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  systemctl daemon-reload && systemctl restart neo-gateway
fi
echo "installed neo into $ROOT: neo-gateway starts at boot (systemctl status neo-gateway)"
"#;
