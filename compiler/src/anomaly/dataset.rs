//! Labelled image sets for training and evaluating detectors, in the two layouts the product
//! meets: MVTec AD (`train/good`, `test/<type>/`, `ground_truth/<type>/<name>_mask.png`) and
//! the magnetic-tile set (`MT_<class>/Imgs/<name>.jpg` with a same-named `.png` mask;
//! `MT_Free` is normal).

use crate::error::{CompileError, Result};
use neo_runtime::preprocess;
use std::path::{Path, PathBuf};

/// Good images used for training in a magnetic-tile layout unless told otherwise.
pub const MT_DEFAULT_TRAIN_GOOD: usize = 100;

/// One labelled test image.
#[derive(Debug, Clone)]
pub struct Sample {
    pub path: PathBuf,
    /// Defect type, or "good".
    pub kind: String,
    pub defective: bool,
    /// Pixel mask (non-zero = defect), where the dataset has one.
    pub mask: Option<PathBuf>,
}

/// A dataset split into good training images and labelled test images.
#[derive(Debug)]
pub struct Dataset {
    pub layout: &'static str,
    pub train_good: Vec<PathBuf>,
    pub test: Vec<Sample>,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> CompileError + '_ {
    move |source| CompileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn subdirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut d: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    d.sort();
    Ok(d)
}

fn name_of(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

impl Dataset {
    /// Detects the layout of `dir`. `train_good` limits the good training images of a
    /// magnetic-tile layout (the rest of `MT_Free` is tested); MVTec has its own split.
    pub fn open(dir: &Path, train_good: Option<usize>) -> Result<Dataset> {
        let ds = if dir.join("test").is_dir() {
            Self::mvtec(dir)?
        } else if dir.join("MT_Free").is_dir() {
            Self::magnetic_tile(dir, train_good.unwrap_or(MT_DEFAULT_TRAIN_GOOD))?
        } else {
            return Err(CompileError::Options(format!(
                "{} is neither an MVTec AD layout (train/good, test/<type>/) nor a magnetic-tile layout (MT_Free/Imgs, MT_<defect>/Imgs)",
                dir.display()
            )));
        };
        if !ds.test.iter().any(|s| s.defective) || ds.test.iter().all(|s| s.defective) {
            return Err(CompileError::Options(format!(
                "{} needs both good and defective test images",
                dir.display()
            )));
        }
        Ok(ds)
    }

    fn mvtec(dir: &Path) -> Result<Dataset> {
        let train = dir.join("train/good");
        let train_good = if train.is_dir() {
            preprocess::list_images(&train).map_err(io(&train))?
        } else {
            vec![]
        };
        let mut test = Vec::new();
        for kind_dir in subdirs(&dir.join("test"))? {
            let kind = name_of(&kind_dir);
            for path in preprocess::list_images(&kind_dir).map_err(io(&kind_dir))? {
                let stem = path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let mask = dir
                    .join("ground_truth")
                    .join(&kind)
                    .join(format!("{stem}_mask.png"));
                test.push(Sample {
                    path,
                    defective: kind != "good",
                    kind: kind.clone(),
                    mask: mask.is_file().then_some(mask),
                });
            }
        }
        Ok(Dataset {
            layout: "mvtec",
            train_good,
            test,
        })
    }

    fn magnetic_tile(dir: &Path, train_good: usize) -> Result<Dataset> {
        let mut train = Vec::new();
        let mut test = Vec::new();
        for class_dir in subdirs(dir)? {
            let class = name_of(&class_dir);
            let Some(kind) = class.strip_prefix("MT_") else {
                continue;
            };
            let imgs = class_dir.join("Imgs");
            // Images are JPEG; the PNG of the same name beside each is its mask.
            let jpgs: Vec<PathBuf> = preprocess::list_images(&imgs)
                .map_err(io(&imgs))?
                .into_iter()
                .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("jpg")))
                .collect();
            let good = kind == "Free";
            for (i, path) in jpgs.into_iter().enumerate() {
                let mask = path.with_extension("png");
                if good && i < train_good {
                    train.push(path);
                } else {
                    test.push(Sample {
                        path,
                        kind: if good {
                            "good".into()
                        } else {
                            kind.to_string()
                        },
                        defective: !good,
                        mask: mask.is_file().then_some(mask),
                    });
                }
            }
        }
        Ok(Dataset {
            layout: "magnetic-tile",
            train_good: train,
            test,
        })
    }
}
