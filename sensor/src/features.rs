//! Streaming feature extraction over sliding windows.
//!
//! Two kinds of input:
//! - **vibration**: raw accelerometer samples (kHz rates), one or more channels; per window
//!   and channel: band RMS of acceleration (10–1,000 Hz and broadband, what Monitron
//!   exports), velocity RMS in 10–1,000 Hz (ISO 20816's quantity), peak, crest factor,
//!   kurtosis, skewness, RMS in configured spectral bands, and the envelope spectrum's
//!   prominence at the bearing fault frequencies (BPFO, BPFI, BSF, FTF);
//! - **process**: already aggregated signals (one value per channel per time step, e.g.
//!   SKAB's 1 Hz RMS, pressure, current, temperature); per window and channel: mean and,
//!   optionally, standard deviation, min, max and slope.
//!
//! Non-finite samples are replaced by the channel's previous good value and counted; a
//! window with too many of them is skipped (reported, never scored).

use crate::error::{Result, SensorError};
use rustfft::num_complex::Complex;
use rustfft::{Fft, FftPlanner};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Standard gravity, m/s² per g.
pub const G: f64 = 9.806_65;

/// How raw samples become feature vectors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FeatureConfig {
    Vibration(VibrationConfig),
    Process(ProcessConfig),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccelUnit {
    /// Standard gravity.
    G,
    /// Metres per second squared.
    MS2,
}

impl AccelUnit {
    fn to_ms2(self) -> f64 {
        match self {
            AccelUnit::G => G,
            AccelUnit::MS2 => 1.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VibrationConfig {
    pub sample_rate_hz: f64,
    /// Samples per window (per channel).
    pub window: usize,
    /// Samples between the starts of consecutive windows.
    pub hop: usize,
    pub units: AccelUnit,
    /// Broadband acceleration RMS band (Monitron: 0–6,000 Hz).
    pub broadband_hz: [f64; 2],
    /// Extra spectral bands whose RMS are features.
    pub bands_hz: Vec<[f64; 2]>,
    /// Band-pass applied before demodulation for the envelope spectrum.
    pub envelope_band_hz: [f64; 2],
    /// Bearing geometry and shaft speed: adds the envelope features at the fault
    /// frequencies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bearing: Option<Bearing>,
}

/// Rolling-element bearing geometry and shaft speed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bearing {
    pub balls: u32,
    /// Same unit as `pitch_diameter`.
    pub ball_diameter: f64,
    pub pitch_diameter: f64,
    pub contact_angle_deg: f64,
    pub shaft_hz: f64,
}

impl Bearing {
    /// The SKF 6205-2RS JEM drive-end bearing of the CWRU test rig, at `rpm`.
    pub fn cwru_drive_end(rpm: f64) -> Self {
        Bearing {
            balls: 9,
            ball_diameter: 0.3126,
            pitch_diameter: 1.537,
            contact_angle_deg: 0.0,
            shaft_hz: rpm / 60.0,
        }
    }

    /// (name, Hz) of the four classic fault frequencies.
    pub fn fault_frequencies(&self) -> [(&'static str, f64); 4] {
        let r =
            self.ball_diameter / self.pitch_diameter * self.contact_angle_deg.to_radians().cos();
        let n = f64::from(self.balls);
        let fr = self.shaft_hz;
        [
            ("bpfo", n / 2.0 * fr * (1.0 - r)),
            ("bpfi", n / 2.0 * fr * (1.0 + r)),
            (
                "bsf",
                self.pitch_diameter / (2.0 * self.ball_diameter) * fr * (1.0 - r * r),
            ),
            ("ftf", fr / 2.0 * (1.0 - r)),
        ]
    }
}

impl VibrationConfig {
    /// Defaults for a sampling rate: windows of the power of two nearest 1/6 s (2,048
    /// samples at 12 kHz), hop of an eighth window, octave bands from 10 Hz up to Nyquist,
    /// envelope band in the upper part of the spectrum.
    pub fn for_rate(sample_rate_hz: f64, units: AccelUnit) -> Self {
        let nyquist = sample_rate_hz / 2.0;
        let window = ((sample_rate_hz / 6.0).max(256.0).log2().round() as u32).min(16);
        let window = 1usize << window;
        let mut bands = Vec::new();
        let mut lo = 10.0;
        while lo * 2.0 <= nyquist && bands.len() < 10 {
            bands.push([lo, lo * 2.0]);
            lo *= 2.0;
        }
        VibrationConfig {
            sample_rate_hz,
            window,
            hop: window / 8,
            units,
            broadband_hz: [0.0, 6000f64.min(nyquist)],
            bands_hz: bands,
            envelope_band_hz: [nyquist * 0.35, nyquist * 0.8],
            bearing: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessStat {
    Mean,
    Std,
    Min,
    Max,
    /// Least-squares slope per time step.
    Slope,
}

impl ProcessStat {
    fn name(self) -> &'static str {
        match self {
            ProcessStat::Mean => "mean",
            ProcessStat::Std => "std",
            ProcessStat::Min => "min",
            ProcessStat::Max => "max",
            ProcessStat::Slope => "slope",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessConfig {
    /// Time steps per window.
    pub window: usize,
    pub hop: usize,
    pub stats: Vec<ProcessStat>,
    /// Nominal time between rows, seconds.
    pub period_s: f64,
    /// A gap longer than this many periods restarts the window (no window spans a gap).
    pub max_gap_periods: f64,
}

/// One feature: its name and whether the model should see its logarithm (positive,
/// heavy-tailed quantities such as energies).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureDef {
    pub name: String,
    pub log: bool,
}

/// The features of one window.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureWindow {
    /// Index (sample or row, counted from the start of the stream) of the window's last
    /// sample.
    pub end: u64,
    /// Timestamp of the window's last row, seconds (process input with timestamps).
    pub time_s: Option<f64>,
    pub values: Vec<f64>,
    /// Non-finite samples replaced in this window.
    pub repaired: usize,
}

/// What a push produced.
#[derive(Debug, Clone, PartialEq)]
pub enum WindowOutcome {
    Features(FeatureWindow),
    /// The window had too many bad samples to be trusted.
    Skipped {
        end: u64,
        reason: String,
    },
}

/// A window is skipped when more than this share of its samples had to be repaired.
pub const MAX_REPAIRED_SHARE: f64 = 0.05;

impl FeatureConfig {
    /// Checks the configuration against the channels it will be fed.
    pub fn validate(&self, channels: &[String]) -> Result<()> {
        let err = |m: String| Err(SensorError::Config(m));
        if channels.is_empty() {
            return err("no channels".into());
        }
        match self {
            FeatureConfig::Vibration(c) => {
                if !(c.sample_rate_hz.is_finite() && c.sample_rate_hz > 0.0) {
                    return err(format!(
                        "sample_rate_hz must be positive, got {}",
                        c.sample_rate_hz
                    ));
                }
                if c.window < 64 || c.hop == 0 || c.hop > c.window {
                    return err(format!(
                        "window must be at least 64 samples and hop in 1..=window (window {}, hop {})",
                        c.window, c.hop
                    ));
                }
                let nyquist = c.sample_rate_hz / 2.0;
                let df = c.sample_rate_hz / c.window as f64;
                let mut bands = vec![("10-1000 Hz RMS band".to_string(), [10.0, 1000.0])];
                bands.push(("broadband_hz".into(), c.broadband_hz));
                bands.push(("envelope_band_hz".into(), c.envelope_band_hz));
                for b in &c.bands_hz {
                    bands.push((format!("band {}-{} Hz", b[0], b[1]), *b));
                }
                for (name, [lo, hi]) in bands {
                    if !(lo >= 0.0 && hi > lo) {
                        return err(format!("{name}: the band must satisfy 0 <= low < high"));
                    }
                    if hi > nyquist + 1e-9 {
                        return err(format!(
                            "{name} reaches {hi} Hz, which needs a sampling rate of at least {} Hz; \
                             this stream is sampled at {} Hz (lower the band or sample faster)",
                            2.0 * hi,
                            c.sample_rate_hz
                        ));
                    }
                    if hi - lo < df {
                        return err(format!(
                            "{name} is narrower than one spectral bin ({df:.2} Hz with {}-sample windows); \
                             widen it or use longer windows",
                            c.window
                        ));
                    }
                }
                if let Some(b) = &c.bearing {
                    if b.balls == 0
                        || b.ball_diameter <= 0.0
                        || b.pitch_diameter <= b.ball_diameter
                        || b.shaft_hz <= 0.0
                    {
                        return err("bearing: balls > 0, 0 < ball_diameter < pitch_diameter and shaft_hz > 0 are required".into());
                    }
                    for (name, f) in b.fault_frequencies() {
                        if 3.0 * f > nyquist {
                            return err(format!("bearing {name} at {f:.1} Hz: its third harmonic is above Nyquist ({nyquist} Hz)"));
                        }
                    }
                }
                Ok(())
            }
            FeatureConfig::Process(c) => {
                if c.window == 0 || c.hop == 0 || c.hop > c.window {
                    return err(format!(
                        "window must be >= 1 and hop in 1..=window (window {}, hop {})",
                        c.window, c.hop
                    ));
                }
                if c.stats.is_empty() {
                    return err(
                        "stats is empty: list at least one of mean, std, min, max, slope".into(),
                    );
                }
                if c.window == 1 && c.stats.iter().any(|s| *s != ProcessStat::Mean) {
                    return err("std, min, max and slope need a window of at least 2 rows".into());
                }
                if !(c.period_s > 0.0 && c.max_gap_periods >= 1.0) {
                    return err("period_s must be positive and max_gap_periods at least 1".into());
                }
                Ok(())
            }
        }
    }

    /// The features produced for these channels, in order.
    pub fn features(&self, channels: &[String]) -> Vec<FeatureDef> {
        let mut out = Vec::new();
        let mut push = |ch: &str, name: &str, log: bool| {
            out.push(FeatureDef {
                name: format!("{ch}.{name}"),
                log,
            })
        };
        for ch in channels {
            match self {
                FeatureConfig::Vibration(c) => {
                    push(ch, "acc_rms_10_1000", true);
                    push(
                        ch,
                        &format!("acc_rms_{}_{}", c.broadband_hz[0], c.broadband_hz[1]),
                        true,
                    );
                    push(ch, "vel_rms_10_1000_mm_s", true);
                    push(ch, "peak", true);
                    push(ch, "crest", true);
                    push(ch, "kurtosis", true);
                    push(ch, "skewness", false);
                    for b in &c.bands_hz {
                        push(ch, &format!("band_{}_{}", b[0], b[1]), true);
                    }
                    if let Some(b) = &c.bearing {
                        for (name, _) in b.fault_frequencies() {
                            push(ch, &format!("env_{name}"), true);
                        }
                    }
                }
                FeatureConfig::Process(c) => {
                    for s in &c.stats {
                        push(ch, s.name(), false);
                    }
                }
            }
        }
        out
    }
}

/// Per-channel sample buffer with repair bookkeeping.
#[derive(Debug, Clone, Default)]
struct ChannelBuf {
    samples: Vec<f64>,
    repaired: Vec<bool>,
    last_good: Option<f64>,
}

impl ChannelBuf {
    fn push(&mut self, x: f64) {
        if x.is_finite() {
            self.samples.push(x);
            self.repaired.push(false);
            self.last_good = Some(x);
        } else {
            self.samples.push(self.last_good.unwrap_or(0.0));
            self.repaired.push(true);
        }
    }

    fn drain(&mut self, n: usize) {
        let n = n.min(self.samples.len());
        self.samples.drain(..n);
        self.repaired.drain(..n);
    }

    fn clear(&mut self) {
        self.samples.clear();
        self.repaired.clear();
    }
}

/// Streaming extractor: push samples (vibration) or rows (process), get feature windows.
pub struct Extractor {
    config: FeatureConfig,
    channels: Vec<String>,
    bufs: Vec<ChannelBuf>,
    times: Vec<f64>,
    /// Samples (or rows) consumed so far.
    count: u64,
    last_time: Option<f64>,
    spectral: Option<Spectral>,
    /// Rows dropped because their timestamp was not after the previous one.
    pub out_of_order: u64,
    /// Gaps longer than `max_gap_periods` (the window restarted after each).
    pub gaps: u64,
}

impl Extractor {
    pub fn new(config: FeatureConfig, channels: Vec<String>) -> Result<Self> {
        config.validate(&channels)?;
        let spectral = match &config {
            FeatureConfig::Vibration(c) => Some(Spectral::new(c)),
            FeatureConfig::Process(_) => None,
        };
        Ok(Extractor {
            bufs: vec![ChannelBuf::default(); channels.len()],
            config,
            channels,
            times: Vec::new(),
            count: 0,
            last_time: None,
            spectral,
            out_of_order: 0,
            gaps: 0,
        })
    }

    pub fn config(&self) -> &FeatureConfig {
        &self.config
    }

    pub fn channels(&self) -> &[String] {
        &self.channels
    }

    pub fn feature_defs(&self) -> Vec<FeatureDef> {
        self.config.features(&self.channels)
    }

    fn window_hop(&self) -> (usize, usize) {
        match &self.config {
            FeatureConfig::Vibration(c) => (c.window, c.hop),
            FeatureConfig::Process(c) => (c.window, c.hop),
        }
    }

    /// Forgets buffered samples (after a gap in the stream), keeping the sample count.
    pub fn reset(&mut self) {
        self.bufs.iter_mut().for_each(ChannelBuf::clear);
        self.times.clear();
    }

    /// Pushes one frame: one sample per channel, in channel order. `time_s` is required
    /// for process input with gap checks, ignored for vibration.
    pub fn push(&mut self, frame: &[f64], time_s: Option<f64>) -> Result<Option<WindowOutcome>> {
        if frame.len() != self.channels.len() {
            return Err(SensorError::Config(format!(
                "a frame has {} values but the model has {} channels ({})",
                frame.len(),
                self.channels.len(),
                self.channels.join(", ")
            )));
        }
        // Every frame counts, dropped ones too: a window's `end` is its frame's index in the
        // stream (evaluation lines windows up with the rows' labels by it).
        self.count += 1;
        if let (FeatureConfig::Process(c), Some(t)) = (&self.config, time_s) {
            if !t.is_finite() {
                self.out_of_order += 1;
                return Ok(None);
            }
            if let Some(last) = self.last_time {
                if t <= last {
                    self.out_of_order += 1;
                    return Ok(None);
                }
                if t - last > c.max_gap_periods * c.period_s {
                    self.gaps += 1;
                    self.reset();
                }
            }
            self.last_time = Some(t);
        }
        for (buf, &x) in self.bufs.iter_mut().zip(frame) {
            buf.push(x);
        }
        if let Some(t) = time_s {
            self.times.push(t);
        }
        let (window, hop) = self.window_hop();
        if self.bufs[0].samples.len() < window {
            return Ok(None);
        }
        let outcome = self.compute();
        for buf in &mut self.bufs {
            buf.drain(hop);
        }
        let n = hop.min(self.times.len());
        self.times.drain(..n);
        Ok(Some(outcome))
    }

    /// Pushes a block of interleaved frames (`channels` values per frame) and returns every
    /// window completed on the way.
    pub fn push_interleaved(&mut self, samples: &[f64]) -> Result<Vec<WindowOutcome>> {
        let c = self.channels.len();
        if !samples.len().is_multiple_of(c) {
            return Err(SensorError::Config(format!(
                "{} samples is not a whole number of {c}-channel frames",
                samples.len()
            )));
        }
        let mut out = Vec::new();
        for frame in samples.chunks_exact(c) {
            if let Some(w) = self.push(frame, None)? {
                out.push(w);
            }
        }
        Ok(out)
    }

    fn compute(&mut self) -> WindowOutcome {
        let end = self.count - 1;
        let repaired: usize = self
            .bufs
            .iter()
            .map(|b| b.repaired.iter().filter(|r| **r).count())
            .sum();
        let total: usize = self.bufs.iter().map(|b| b.samples.len()).sum();
        if repaired as f64 > MAX_REPAIRED_SHARE * total as f64 {
            return WindowOutcome::Skipped {
                end,
                reason: format!("{repaired} of {total} samples in the window were NaN or infinite"),
            };
        }
        let mut values = Vec::new();
        match &self.config {
            FeatureConfig::Vibration(c) => {
                let spectral = self.spectral.get_or_insert_with(|| Spectral::new(c));
                for buf in &self.bufs {
                    spectral.channel_features(c, &buf.samples, &mut values);
                }
            }
            FeatureConfig::Process(c) => {
                for buf in &self.bufs {
                    process_features(c, &buf.samples, &mut values);
                }
            }
        }
        WindowOutcome::Features(FeatureWindow {
            end,
            time_s: self.times.last().copied(),
            values,
            repaired,
        })
    }
}

fn process_features(c: &ProcessConfig, x: &[f64], out: &mut Vec<f64>) {
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    for s in &c.stats {
        out.push(match s {
            ProcessStat::Mean => mean,
            ProcessStat::Std => (x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt(),
            ProcessStat::Min => x.iter().copied().fold(f64::INFINITY, f64::min),
            ProcessStat::Max => x.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            ProcessStat::Slope => {
                let tm = (n - 1.0) / 2.0;
                let (mut num, mut den) = (0.0, 0.0);
                for (i, v) in x.iter().enumerate() {
                    let dt = i as f64 - tm;
                    num += dt * (v - mean);
                    den += dt * dt;
                }
                if den > 0.0 {
                    num / den
                } else {
                    0.0
                }
            }
        });
    }
}

/// FFT plans and scratch buffers for one window length.
struct Spectral {
    n: usize,
    forward: Arc<dyn Fft<f64>>,
    inverse: Arc<dyn Fft<f64>>,
    hann: Vec<f64>,
    hann_power: f64,
    buf: Vec<Complex<f64>>,
    env: Vec<Complex<f64>>,
    scratch: Vec<Complex<f64>>,
}

impl Spectral {
    fn new(c: &VibrationConfig) -> Self {
        let n = c.window;
        let mut planner = FftPlanner::new();
        let forward = planner.plan_fft_forward(n);
        let inverse = planner.plan_fft_inverse(n);
        let hann: Vec<f64> = (0..n)
            .map(|i| 0.5 - 0.5 * (2.0 * std::f64::consts::PI * i as f64 / n as f64).cos())
            .collect();
        let hann_power = hann.iter().map(|w| w * w).sum::<f64>() / n as f64;
        let scratch_len = forward
            .get_inplace_scratch_len()
            .max(inverse.get_inplace_scratch_len());
        Spectral {
            n,
            forward,
            inverse,
            hann,
            hann_power,
            buf: vec![Complex::default(); n],
            env: vec![Complex::default(); n],
            scratch: vec![Complex::default(); scratch_len],
        }
    }

    /// Appends one channel's vibration features (in the order of `FeatureConfig::features`).
    fn channel_features(&mut self, c: &VibrationConfig, x: &[f64], out: &mut Vec<f64>) {
        let n = self.n;
        let nf = n as f64;
        let df = c.sample_rate_hz / nf;
        let mean = x.iter().sum::<f64>() / nf;
        let (mut m2, mut m3, mut m4, mut peak) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
        for v in x {
            let d = v - mean;
            let d2 = d * d;
            m2 += d2;
            m3 += d2 * d;
            m4 += d2 * d2;
            peak = peak.max(d.abs());
        }
        m2 /= nf;
        m3 /= nf;
        m4 /= nf;
        let rms = m2.sqrt();
        let flat = m2 <= 1e-24;
        let (crest, kurtosis, skewness) = if flat {
            (0.0, 0.0, 0.0)
        } else {
            (peak / rms, m4 / (m2 * m2), m3 / m2.powf(1.5))
        };

        // Power spectrum of the Hann-windowed, demeaned signal, one-sided and scaled so a
        // band's sum is that band's mean square.
        for (i, (b, v)) in self.buf.iter_mut().zip(x).enumerate() {
            *b = Complex::new((v - mean) * self.hann[i], 0.0);
        }
        self.forward
            .process_with_scratch(&mut self.buf, &mut self.scratch);
        let scale = 2.0 / (nf * nf * self.hann_power);
        let power = |k: usize, buf: &[Complex<f64>]| buf[k].norm_sqr() * scale;
        let bins = |[lo, hi]: [f64; 2]| {
            let a = ((lo / df).ceil() as usize).max(1);
            let b = ((hi / df).floor() as usize).min(n / 2);
            a..=b
        };
        let band_rms = |band: [f64; 2], buf: &[Complex<f64>]| {
            bins(band).map(|k| power(k, buf)).sum::<f64>().sqrt()
        };
        out.push(band_rms([10.0, 1000.0], &self.buf));
        out.push(band_rms(c.broadband_hz, &self.buf));
        let to_mm_s = c.units.to_ms2() * 1000.0;
        let vel_ms: f64 = bins([10.0, 1000.0])
            .map(|k| power(k, &self.buf) / (2.0 * std::f64::consts::PI * k as f64 * df).powi(2))
            .sum();
        out.push(vel_ms.sqrt() * to_mm_s);
        out.push(peak);
        out.push(crest);
        out.push(kurtosis);
        out.push(skewness);
        for b in &c.bands_hz {
            out.push(band_rms(*b, &self.buf));
        }

        if let Some(bearing) = &c.bearing {
            // Envelope: analytic signal of the band-passed (unwindowed) signal.
            for (e, v) in self.env.iter_mut().zip(x) {
                *e = Complex::new(v - mean, 0.0);
            }
            self.forward
                .process_with_scratch(&mut self.env, &mut self.scratch);
            let keep = bins(c.envelope_band_hz);
            for (k, e) in self.env.iter_mut().enumerate() {
                if keep.contains(&k) {
                    *e *= 2.0;
                } else {
                    *e = Complex::default();
                }
            }
            self.inverse
                .process_with_scratch(&mut self.env, &mut self.scratch);
            let mags: Vec<f64> = self.env.iter().map(|e| e.norm() / nf).collect();
            let env_mean = mags.iter().sum::<f64>() / nf;
            for (i, (e, m)) in self.env.iter_mut().zip(&mags).enumerate() {
                *e = Complex::new((m - env_mean) * self.hann[i], 0.0);
            }
            self.forward
                .process_with_scratch(&mut self.env, &mut self.scratch);
            let amp: Vec<f64> = self.env[..=n / 2].iter().map(|e| e.norm()).collect();
            // Noise floor: median amplitude between 1 Hz and 500 Hz (or Nyquist).
            let hi = ((500.0 / df) as usize).clamp(2, n / 2);
            let mut floor: Vec<f64> = amp[1..hi].to_vec();
            floor.sort_by(f64::total_cmp);
            let floor = floor[floor.len() / 2].max(1e-30);
            for (_, f) in bearing.fault_frequencies() {
                let mut sum = 0.0;
                for h in 1..=3 {
                    let centre = (h as f64 * f / df).round() as usize;
                    let a = centre.saturating_sub(2).max(1);
                    let b = (centre + 2).min(n / 2);
                    sum += amp[a..=b].iter().copied().fold(0.0, f64::max);
                }
                out.push(sum / (3.0 * floor));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sine(fs: f64, f: f64, amp: f64, n: usize) -> Vec<f64> {
        (0..n)
            .map(|i| amp * (2.0 * std::f64::consts::PI * f * i as f64 / fs).sin())
            .collect()
    }

    fn vib(fs: f64) -> VibrationConfig {
        let mut c = VibrationConfig::for_rate(fs, AccelUnit::MS2);
        c.window = 4096;
        c.hop = 4096;
        c
    }

    #[test]
    fn band_rms_and_velocity_of_a_sine_are_exact() {
        let fs = 12_000.0;
        let c = vib(fs);
        let names = c_features(&c);
        let mut ex = Extractor::new(FeatureConfig::Vibration(c), vec!["x".into()]).expect("config");
        // 159.155 Hz: ω = 1000 rad/s, so velocity amplitude = acceleration amplitude / 1000.
        let f = 1000.0 / (2.0 * std::f64::consts::PI);
        let x = sine(fs, f, 2.0, 4096);
        let w = match ex.push_interleaved(&x).expect("push").pop() {
            Some(WindowOutcome::Features(w)) => w,
            other => panic!("{other:?}"),
        };
        let get = |name: &str| w.values[names.iter().position(|n| n == name).expect(name)];
        let rms = 2.0 / 2f64.sqrt();
        assert!(
            (get("x.acc_rms_10_1000") - rms).abs() < 0.01 * rms,
            "{}",
            get("x.acc_rms_10_1000")
        );
        assert!((get("x.acc_rms_0_6000") - rms).abs() < 0.01 * rms);
        // 1.414 m/s² at 1000 rad/s → 1.414 mm/s.
        assert!(
            (get("x.vel_rms_10_1000_mm_s") - rms).abs() < 0.02 * rms,
            "{}",
            get("x.vel_rms_10_1000_mm_s")
        );
        assert!((get("x.crest") - 2f64.sqrt()).abs() < 0.01);
        assert!((get("x.kurtosis") - 1.5).abs() < 0.01);
        assert!(get("x.skewness").abs() < 0.01);
        // Energy sits in the two bands around 159 Hz only.
        assert!(get("x.band_80_160").hypot(get("x.band_160_320")) > 0.99 * rms);
        assert!(get("x.band_640_1280") < 0.01 * rms);
    }

    fn c_features(c: &VibrationConfig) -> Vec<String> {
        FeatureConfig::Vibration(c.clone())
            .features(&["x".to_string()])
            .into_iter()
            .map(|d| d.name)
            .collect()
    }

    #[test]
    fn envelope_finds_the_modulating_fault_frequency() {
        let fs = 12_000.0;
        let mut c = vib(fs);
        c.bearing = Some(Bearing::cwru_drive_end(1797.0));
        let bpfo = c
            .bearing
            .as_ref()
            .map(|b| b.fault_frequencies()[0].1)
            .unwrap_or(0.0);
        assert!((bpfo - 107.36).abs() < 0.1, "BPFO {bpfo}");
        let names = c_features(&c);
        let mut ex = Extractor::new(FeatureConfig::Vibration(c), vec!["x".into()]).expect("config");
        // A 3 kHz resonance amplitude-modulated at BPFO.
        let x: Vec<f64> = (0..4096)
            .map(|i| {
                let t = i as f64 / fs;
                (1.0 + 0.8 * (2.0 * std::f64::consts::PI * bpfo * t).cos())
                    * (2.0 * std::f64::consts::PI * 3000.0 * t).sin()
            })
            .collect();
        let w = match ex.push_interleaved(&x).expect("push").pop() {
            Some(WindowOutcome::Features(w)) => w,
            other => panic!("{other:?}"),
        };
        let get = |name: &str| w.values[names.iter().position(|n| n == name).expect(name)];
        assert!(
            get("x.env_bpfo") > 10.0 * get("x.env_bpfi"),
            "{} vs {}",
            get("x.env_bpfo"),
            get("x.env_bpfi")
        );
        assert!(get("x.env_bpfo") > 10.0 * get("x.env_ftf"));
    }

    #[test]
    fn windows_slide_by_hop_and_nan_is_repaired_or_skipped() {
        let mut c = vib(12_000.0);
        c.hop = 1024;
        let mut ex = Extractor::new(FeatureConfig::Vibration(c), vec!["a".into(), "b".into()])
            .expect("config");
        let mut x = vec![0.0; 2 * (4096 + 3 * 1024)];
        for (i, v) in x.iter_mut().enumerate() {
            *v = ((i * 7919) % 101) as f64 / 50.0 - 1.0;
        }
        x[10] = f64::NAN;
        let out = ex.push_interleaved(&x).expect("push");
        assert_eq!(out.len(), 4);
        match &out[0] {
            WindowOutcome::Features(w) => {
                assert_eq!(w.end, 4095);
                assert_eq!(w.repaired, 1);
                assert!(w.values.iter().all(|v| v.is_finite()));
            }
            other => panic!("{other:?}"),
        }
        // A window that is 10 % NaN is skipped, with the reason.
        let bad = vec![f64::NAN; 2 * 1024];
        let out = ex.push_interleaved(&bad).expect("push");
        assert!(matches!(&out[0], WindowOutcome::Skipped { reason, .. } if reason.contains("NaN")));
    }

    #[test]
    fn a_band_above_nyquist_is_refused_with_the_rate_it_needs() {
        let mut c = vib(12_000.0);
        c.sample_rate_hz = 1_000.0;
        c.window = 512;
        c.hop = 256;
        let e = FeatureConfig::Vibration(c)
            .validate(&["x".into()])
            .expect_err("must refuse");
        let msg = e.to_string();
        assert!(
            msg.contains("at least 2000 Hz") && msg.contains("1000 Hz"),
            "{msg}"
        );
    }

    #[test]
    fn process_windows_restart_after_gaps_and_drop_out_of_order_rows() {
        let c = ProcessConfig {
            window: 3,
            hop: 1,
            stats: vec![ProcessStat::Mean, ProcessStat::Slope],
            period_s: 1.0,
            max_gap_periods: 3.0,
        };
        let mut ex = Extractor::new(FeatureConfig::Process(c), vec!["p".into()]).expect("config");
        let mut got = Vec::new();
        for (t, v) in [
            (0.0, 1.0),
            (1.0, 2.0),
            (2.0, 3.0),
            (1.5, 9.0),
            (3.0, 4.0),
            (10.0, 5.0),
            (11.0, 6.0),
            (12.0, 7.0),
        ] {
            if let Some(WindowOutcome::Features(w)) = ex.push(&[v], Some(t)).expect("push") {
                got.push((w.end, w.time_s, w.values));
            }
        }
        assert_eq!(ex.out_of_order, 1);
        assert_eq!(ex.gaps, 1);
        assert_eq!(
            got,
            vec![
                // `end` is the frame's index in the stream, the dropped row counted.
                (2, Some(2.0), vec![2.0, 1.0]),
                (4, Some(3.0), vec![3.0, 1.0]),
                (7, Some(12.0), vec![6.0, 1.0]),
            ]
        );
    }
}
