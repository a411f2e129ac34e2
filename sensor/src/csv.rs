//! CSV replay of process data (SKAB's format: `;`-separated, a `datetime` column, one
//! column per sensor, optional `anomaly`/`changepoint` label columns). `,` works too.

use crate::error::{Result, SensorError};
use std::path::Path;

/// Columns that hold labels, never sensor values.
pub const LABEL_COLUMNS: [&str; 2] = ["anomaly", "changepoint"];
const TIME_COLUMNS: [&str; 4] = ["datetime", "timestamp", "time", "date"];

/// A CSV file read into channels.
#[derive(Debug, Clone, PartialEq)]
pub struct CsvData {
    pub file: String,
    pub channels: Vec<String>,
    /// Seconds (since 1970 for date-times, as written for plain numbers); NaN where a
    /// timestamp did not parse. Empty when the file has no time column.
    pub times: Vec<f64>,
    /// One row per line, values in `channels` order (NaN where a cell was empty or not a
    /// number: the extractor repairs and counts those).
    pub rows: Vec<Vec<f64>>,
    /// Label columns present in the file (`anomaly`, `changepoint`), one value per row.
    pub labels: Vec<(String, Vec<f64>)>,
    /// Cells that were empty or not numbers.
    pub bad_cells: usize,
    /// Timestamps that did not parse.
    pub bad_times: usize,
}

impl CsvData {
    pub fn label(&self, name: &str) -> Option<&[f64]> {
        self.labels
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }
}

/// Reads a CSV. `channels`: the columns to keep, in this order (missing ones are an error
/// that lists what the file has); `None` keeps every column that is not time or a label.
pub fn read_csv(path: &Path, channels: Option<&[String]>) -> Result<CsvData> {
    let text = std::fs::read_to_string(path).map_err(|source| SensorError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_csv(&path.display().to_string(), &text, channels)
}

pub fn parse_csv(file: &str, text: &str, channels: Option<&[String]>) -> Result<CsvData> {
    let input = |reason: String| SensorError::Input {
        file: file.to_string(),
        reason,
    };
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header = lines
        .next()
        .ok_or_else(|| input("the file is empty".into()))?;
    let sep = if header.matches(';').count() >= header.matches(',').count() {
        ';'
    } else {
        ','
    };
    let names: Vec<String> = header
        .split(sep)
        .map(|s| s.trim().trim_matches('"').to_string())
        .collect();
    let time_col = names
        .iter()
        .position(|n| TIME_COLUMNS.contains(&n.to_ascii_lowercase().as_str()));
    let label_cols: Vec<(String, usize)> = names
        .iter()
        .enumerate()
        .filter(|(_, n)| LABEL_COLUMNS.contains(&n.to_ascii_lowercase().as_str()))
        .map(|(i, n)| (n.to_ascii_lowercase(), i))
        .collect();
    let selected: Vec<usize> = match channels {
        Some(want) => want
            .iter()
            .map(|w| {
                names
                    .iter()
                    .position(|n| n == w)
                    .ok_or_else(|| SensorError::MissingColumn {
                        file: file.to_string(),
                        column: w.clone(),
                        present: names.join(", "),
                    })
            })
            .collect::<Result<_>>()?,
        None => (0..names.len())
            .filter(|i| Some(*i) != time_col && !label_cols.iter().any(|(_, c)| c == i))
            .collect(),
    };
    if selected.is_empty() {
        return Err(input(
            "no sensor columns (only time and label columns)".into(),
        ));
    }
    let mut data = CsvData {
        file: file.to_string(),
        channels: selected.iter().map(|&i| names[i].clone()).collect(),
        times: Vec::new(),
        rows: Vec::new(),
        labels: label_cols
            .iter()
            .map(|(n, _)| (n.clone(), Vec::new()))
            .collect(),
        bad_cells: 0,
        bad_times: 0,
    };
    for (lineno, line) in lines.enumerate() {
        let cells: Vec<&str> = line.split(sep).map(str::trim).collect();
        if cells.len() != names.len() {
            return Err(input(format!(
                "line {} has {} fields, the header has {}",
                lineno + 2,
                cells.len(),
                names.len()
            )));
        }
        if let Some(tc) = time_col {
            let t = parse_time(cells[tc]);
            if t.is_none() {
                data.bad_times += 1;
            }
            data.times.push(t.unwrap_or(f64::NAN));
        }
        let row = selected
            .iter()
            .map(|&i| match cells[i].parse::<f64>() {
                Ok(v) => v,
                Err(_) => {
                    data.bad_cells += 1;
                    f64::NAN
                }
            })
            .collect();
        data.rows.push(row);
        for ((_, col), (_, out)) in label_cols.iter().zip(data.labels.iter_mut()) {
            out.push(cells[*col].parse::<f64>().unwrap_or(0.0));
        }
    }
    if data.rows.is_empty() {
        return Err(input("no data rows after the header".into()));
    }
    if let Some(tc) = time_col {
        if data.bad_times == data.rows.len() {
            return Err(input(format!(
                "no value of the time column '{}' parses as a time (write YYYY-MM-DD hh:mm:ss[.fff], or seconds)",
                names[tc]
            )));
        }
    }
    Ok(data)
}

/// `YYYY-MM-DD hh:mm:ss[.fff]` (or with `T`) as seconds since 1970-01-01 UTC, or a plain
/// number of seconds.
pub fn parse_time(s: &str) -> Option<f64> {
    let s = s.trim().trim_matches('"');
    if let Ok(v) = s.parse::<f64>() {
        return Some(v);
    }
    let (date, time) = s.split_once([' ', 'T'])?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, mo, da) = (d.next()??, d.next()??, d.next()??);
    let time = time.trim_end_matches('Z');
    let mut t = time.split(':');
    let h = t.next()?.parse::<i64>().ok()?;
    let mi = t.next()?.parse::<i64>().ok()?;
    let sec = t.next().map_or(Some(0.0), |v| v.parse::<f64>().ok())?;
    if !(1..=12).contains(&mo)
        || !(1..=31).contains(&da)
        || h > 23
        || mi > 59
        || !(0.0..61.0).contains(&sec)
    {
        return None;
    }
    // Days from civil (proleptic Gregorian).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (mo + if mo > 2 { -3 } else { 9 }) + 2) / 5 + da - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3600 + mi * 60) as f64 + sec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skab_rows_parse_with_labels_and_bad_cells_counted() {
        let text = "datetime;A;B;anomaly;changepoint\n\
                    2020-03-09 10:14:33;1.0;2.0;0.0;0.0\n\
                    2020-03-09 10:14:34;;2.5;1.0;1.0\n\
                    garbage;3.0;nan-ish;1.0;0.0\n";
        let d = parse_csv("t.csv", text, None).expect("parse");
        assert_eq!(d.channels, vec!["A", "B"]);
        assert_eq!(d.rows.len(), 3);
        assert_eq!(d.times[1] - d.times[0], 1.0);
        assert_eq!(d.times[0], 1_583_748_873.0);
        assert!(d.rows[1][0].is_nan() && d.rows[2][1].is_nan());
        assert_eq!((d.bad_cells, d.bad_times), (2, 1));
        assert_eq!(d.label("anomaly"), Some(&[0.0, 1.0, 1.0][..]));
    }

    #[test]
    fn a_missing_column_is_named_with_the_ones_present() {
        let e = parse_csv(
            "t.csv",
            "time,a,b\n1,2,3\n",
            Some(&["a".into(), "Pressure".into()]),
        )
        .expect_err("missing");
        let m = e.to_string();
        assert!(m.contains("'Pressure'") && m.contains("time, a, b"), "{m}");
    }
}
