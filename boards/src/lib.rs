//! Board profiles: what a target board is (triple, CPU, features, threads, memory budget,
//! default precision). The profiles shipped in `boards/profiles/*.toml` are embedded at build
//! time, so `neoc --target rpi4` works from any directory; a directory of `*.toml` files can
//! override or extend them (`NEO_BOARDS_DIR`).

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Errors from loading board profiles.
#[derive(Debug, thiserror::Error)]
pub enum BoardError {
    #[error("unknown board '{name}'; known boards: {}", known.join(", "))]
    Unknown { name: String, known: Vec<String> },
    #[error("board profile {path}: {message}")]
    Invalid { path: String, message: String },
    #[error("reading board profiles from {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Numeric precision a board runs a model in by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    F32,
    F16,
    Int8,
}

/// One target board.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoardProfile {
    /// Short name used with `--target`.
    pub name: String,
    pub description: String,
    /// Rust target triple of the board's OS.
    pub triple: String,
    /// CPU model (`-C target-cpu` value).
    pub cpu: String,
    #[serde(default)]
    pub cpu_features: Vec<String>,
    /// Inference threads the runtime should use.
    pub threads: usize,
    /// Memory the model may use on the device, in MiB.
    pub memory_budget_mb: u64,
    pub default_precision: Precision,
    /// Whether int8 compute is faster than f32 on this CPU.
    #[serde(default)]
    pub int8_compute: bool,
    #[serde(default)]
    pub gpu: Option<String>,
    /// Camera defaults for stations on this board.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub camera: Option<CameraDefaults>,
    /// GPIO character device and the lines wired for the trigger input and reject output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpio: Option<GpioLines>,
    /// Buses sensors hang off.
    #[serde(default)]
    pub buses: Buses,
}

/// A camera the board usually carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CameraDefaults {
    /// V4L2 device, e.g. `/dev/video0`.
    pub device: String,
    pub width: u32,
    pub height: u32,
    pub fps: f64,
    /// Pixel format asked for first (`MJPG`, `YUYV`, …).
    pub format: String,
}

/// GPIO lines through the Linux character device (`/dev/gpiochipN`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpioLines {
    pub chip: String,
    /// Line offset of the external trigger input (a light barrier, a PLC output).
    pub trigger_line: Option<u32>,
    /// Line offset of the reject output (the ejector's driver).
    pub reject_line: Option<u32>,
    /// Whether the reject line is active low.
    #[serde(default)]
    pub reject_active_low: bool,
}

/// Device nodes of the buses sensors use.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Buses {
    #[serde(default)]
    pub i2c: Vec<String>,
    #[serde(default)]
    pub spi: Vec<String>,
    /// Serial ports (the sensor nodes' wire protocol).
    #[serde(default)]
    pub serial: Vec<String>,
}

const SHIPPED: &[(&str, &str)] = &[
    ("x86_64.toml", include_str!("../profiles/x86_64.toml")),
    ("rpi4.toml", include_str!("../profiles/rpi4.toml")),
    ("rpi5.toml", include_str!("../profiles/rpi5.toml")),
    ("rpi4-32.toml", include_str!("../profiles/rpi4-32.toml")),
    (
        "jetson-orin-nano.toml",
        include_str!("../profiles/jetson-orin-nano.toml"),
    ),
    (
        "x86_64-vnni.toml",
        include_str!("../profiles/x86_64-vnni.toml"),
    ),
];

fn parse(origin: &str, text: &str) -> Result<BoardProfile, BoardError> {
    let profile: BoardProfile = toml::from_str(text).map_err(|e| BoardError::Invalid {
        path: origin.to_string(),
        message: e.to_string(),
    })?;
    if let Some(g) = &profile.gpio {
        if g.trigger_line.is_some() && g.trigger_line == g.reject_line {
            return Err(BoardError::Invalid {
                path: origin.to_string(),
                message: "gpio: trigger_line and reject_line are the same line".into(),
            });
        }
    }
    if let Some(c) = &profile.camera {
        if c.width == 0 || c.height == 0 || c.fps.is_nan() || c.fps <= 0.0 {
            return Err(BoardError::Invalid {
                path: origin.to_string(),
                message: "camera: width, height and fps must be positive".into(),
            });
        }
    }
    if profile.threads == 0 {
        return Err(BoardError::Invalid {
            path: origin.to_string(),
            message: "threads must be at least 1".into(),
        });
    }
    Ok(profile)
}

/// The set of known boards: the shipped ones, plus or overridden by a directory's.
#[derive(Debug, Clone)]
pub struct Boards {
    profiles: Vec<BoardProfile>,
}

impl Boards {
    /// The profiles embedded in this build.
    pub fn shipped() -> Self {
        let profiles = SHIPPED
            .iter()
            .map(|(file, text)| parse(&format!("boards/profiles/{file}"), text))
            .collect::<Result<Vec<_>, _>>()
            // The shipped files are checked by this crate's tests.
            .unwrap_or_default();
        Boards { profiles }
    }

    /// The shipped profiles, with every `*.toml` in `dir` added (same name replaces).
    pub fn with_dir(dir: &Path) -> Result<Self, BoardError> {
        let mut boards = Self::shipped();
        let io = |source| BoardError::Io {
            path: dir.to_path_buf(),
            source,
        };
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        paths.sort();
        for path in paths {
            let text = std::fs::read_to_string(&path).map_err(|source| BoardError::Io {
                path: path.clone(),
                source,
            })?;
            let profile = parse(&path.display().to_string(), &text)?;
            boards.profiles.retain(|p| p.name != profile.name);
            boards.profiles.push(profile);
        }
        Ok(boards)
    }

    /// Shipped profiles, extended by `$NEO_BOARDS_DIR` when it is set.
    pub fn from_env() -> Result<Self, BoardError> {
        match std::env::var_os("NEO_BOARDS_DIR") {
            Some(dir) if !dir.is_empty() => Self::with_dir(Path::new(&dir)),
            _ => Ok(Self::shipped()),
        }
    }

    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.profiles.iter().map(|p| p.name.clone()).collect();
        names.sort();
        names
    }

    pub fn get(&self, name: &str) -> Result<&BoardProfile, BoardError> {
        self.profiles
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| BoardError::Unknown {
                name: name.to_string(),
                known: self.names(),
            })
    }

    pub fn iter(&self) -> impl Iterator<Item = &BoardProfile> {
        self.profiles.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_profile_parses() {
        for (file, text) in SHIPPED {
            let p = parse(file, text).expect("shipped profile parses");
            assert_eq!(
                format!("{}.toml", p.name),
                *file,
                "file name matches board name"
            );
        }
        assert_eq!(
            Boards::shipped().names(),
            [
                "jetson-orin-nano",
                "rpi4",
                "rpi4-32",
                "rpi5",
                "x86_64",
                "x86_64-vnni"
            ]
        );
        // Every ARM board says where its trigger and reject lines are, and no two boards of
        // the same triple disagree on it silently: the 32-bit Pi is its own profile.
        for b in Boards::shipped()
            .iter()
            .filter(|b| !b.triple.starts_with("x86_64"))
        {
            let g = b
                .gpio
                .as_ref()
                .unwrap_or_else(|| panic!("{}: no [gpio]", b.name));
            assert!(
                g.trigger_line.is_some() && g.reject_line.is_some(),
                "{}",
                b.name
            );
            assert!(
                !b.buses.serial.is_empty(),
                "{}: no serial port for sensor nodes",
                b.name
            );
        }
        let armv7 = Boards::shipped().get("rpi4-32").unwrap().triple.clone();
        assert_eq!(armv7, "armv7-unknown-linux-gnueabihf");
    }

    #[test]
    fn the_same_line_for_trigger_and_reject_is_refused() {
        let text = SHIPPED[1].1.replace("reject_line = 27", "reject_line = 17");
        assert!(text.contains("trigger_line = 17"));
        let err = parse("x.toml", &text).unwrap_err().to_string();
        assert!(err.contains("same line"), "{err}");
    }

    #[test]
    fn unknown_board_lists_known_ones() {
        let err = Boards::shipped().get("rpi3").unwrap_err().to_string();
        assert!(err.contains("unknown board 'rpi3'"), "{err}");
        assert!(err.contains("rpi4, rpi4-32, rpi5, x86_64"), "{err}");
    }

    #[test]
    fn a_directory_overrides_and_extends() {
        let dir = std::env::temp_dir().join(format!("neo-boards-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let custom = SHIPPED[1].1.replace("threads = 4", "threads = 2");
        std::fs::write(dir.join("rpi4.toml"), custom).unwrap();
        std::fs::write(
            dir.join("imx8.toml"),
            SHIPPED[1].1.replace("\"rpi4\"", "\"imx8\""),
        )
        .unwrap();
        let boards = Boards::with_dir(&dir).unwrap();
        assert_eq!(boards.get("rpi4").unwrap().threads, 2);
        assert!(boards.get("imx8").is_ok());
        std::fs::write(dir.join("bad.toml"), "name = 3").unwrap();
        let err = Boards::with_dir(&dir).unwrap_err().to_string();
        assert!(err.contains("bad.toml"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
