//! Healthy / Warning / Alarm, the way an operator expects it: a level is entered when
//! `n` of the last `m` windows reach it (persistence: one spike is not an alarm) and left
//! only when fewer than `n` of the last `m` stay above `clear_ratio` × the level
//! (hysteresis: no flapping around the threshold). An absolute ISO 20816-style guard on
//! velocity RMS needs no training and can raise the state on its own.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    Healthy,
    Warning,
    Alarm,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Warning => "warning",
            Health::Alarm => "alarm",
        }
    }
}

/// Machine classes of ISO 10816-1 / 20816-1 (Annex): boundaries of zones A/B, B/C and C/D
/// in mm/s RMS velocity, 10–1,000 Hz.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MachineClass {
    /// Small machines (up to 15 kW).
    I,
    /// Medium machines (15–75 kW), or up to 300 kW on special foundations.
    II,
    /// Large machines on rigid foundations.
    III,
    /// Large machines on soft foundations.
    IV,
}

impl MachineClass {
    pub fn boundaries_mm_s(self) -> [f64; 3] {
        match self {
            MachineClass::I => [0.71, 1.8, 4.5],
            MachineClass::II => [1.12, 2.8, 7.1],
            MachineClass::III => [1.8, 4.5, 11.2],
            MachineClass::IV => [2.8, 7.1, 18.0],
        }
    }

    /// Zone letter A–D of a velocity RMS.
    pub fn zone(self, vel_rms_mm_s: f64) -> char {
        let [ab, bc, cd] = self.boundaries_mm_s();
        if vel_rms_mm_s < ab {
            'A'
        } else if vel_rms_mm_s < bc {
            'B'
        } else if vel_rms_mm_s < cd {
            'C'
        } else {
            'D'
        }
    }
}

impl std::str::FromStr for MachineClass {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_uppercase().as_str() {
            "I" | "1" => Ok(MachineClass::I),
            "II" | "2" => Ok(MachineClass::II),
            "III" | "3" => Ok(MachineClass::III),
            "IV" | "4" => Ok(MachineClass::IV),
            _ => Err(format!("unknown machine class '{s}': use I, II, III or IV")),
        }
    }
}

/// When the state changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlarmPolicy {
    /// Normalized score (1.0 = the model's threshold) at which Warning starts.
    pub warning: f64,
    /// Normalized score at which Alarm starts.
    pub alarm: f64,
    /// `n` of the last `m` windows must reach a level to enter it.
    pub n: usize,
    pub m: usize,
    /// A level is kept while `n` of the last `m` windows stay above `clear_ratio` × level.
    pub clear_ratio: f64,
    /// ISO 20816-style guard on velocity RMS (vibration models): zone C → Warning, D → Alarm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iso_class: Option<MachineClass>,
}

impl Default for AlarmPolicy {
    fn default() -> Self {
        AlarmPolicy {
            warning: 1.0,
            alarm: 2.0,
            n: 3,
            m: 5,
            clear_ratio: 0.8,
            iso_class: None,
        }
    }
}

impl AlarmPolicy {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.warning > 0.0 && self.alarm >= self.warning) {
            return Err(format!(
                "alarm levels need 0 < warning <= alarm (warning {}, alarm {})",
                self.warning, self.alarm
            ));
        }
        if self.n == 0 || self.m < self.n || self.m > 1000 {
            return Err(format!(
                "persistence needs 1 <= n <= m <= 1000 (n {}, m {})",
                self.n, self.m
            ));
        }
        if !(self.clear_ratio > 0.0 && self.clear_ratio <= 1.0) {
            return Err(format!(
                "clear_ratio must be in (0, 1], got {}",
                self.clear_ratio
            ));
        }
        Ok(())
    }
}

/// The state machine.
#[derive(Debug, Clone)]
pub struct AlarmState {
    policy: AlarmPolicy,
    scores: VecDeque<f64>,
    zones: VecDeque<Health>,
    health: Health,
}

/// What one window did to the state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transition {
    pub health: Health,
    pub previous: Health,
    /// ISO zone of this window when the guard is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<char>,
    /// What decided the state: "model", "iso" or "both".
    pub cause: &'static str,
}

impl Transition {
    pub fn changed(&self) -> bool {
        self.health != self.previous
    }
}

impl AlarmState {
    pub fn new(policy: AlarmPolicy) -> Self {
        AlarmState {
            scores: VecDeque::with_capacity(policy.m),
            zones: VecDeque::with_capacity(policy.m),
            policy,
            health: Health::Healthy,
        }
    }

    pub fn health(&self) -> Health {
        self.health
    }

    /// Feeds one window: its normalized score and, for vibration, its velocity RMS.
    pub fn update(&mut self, normalized: f64, vel_rms_mm_s: Option<f64>) -> Transition {
        let p = &self.policy;
        if self.scores.len() == p.m {
            self.scores.pop_front();
        }
        // A non-finite score counts as the worst (fail loud, not silent).
        self.scores.push_back(if normalized.is_nan() {
            f64::INFINITY
        } else {
            normalized
        });
        let zone = p.iso_class.zip(vel_rms_mm_s).map(|(c, v)| c.zone(v));
        if let Some(z) = zone {
            if self.zones.len() == p.m {
                self.zones.pop_front();
            }
            self.zones.push_back(match z {
                'D' => Health::Alarm,
                'C' => Health::Warning,
                _ => Health::Healthy,
            });
        }
        let current = self.health;
        let level_held = |level: f64, lh: Health| {
            let bar = if lh <= current {
                level * p.clear_ratio
            } else {
                level
            };
            self.scores.iter().filter(|s| **s >= bar).count() >= p.n
        };
        let model = if level_held(p.alarm, Health::Alarm) {
            Health::Alarm
        } else if level_held(p.warning, Health::Warning) {
            Health::Warning
        } else {
            Health::Healthy
        };
        let iso = if self.zones.iter().filter(|z| **z >= Health::Alarm).count() >= p.n {
            Health::Alarm
        } else if self.zones.iter().filter(|z| **z >= Health::Warning).count() >= p.n {
            Health::Warning
        } else {
            Health::Healthy
        };
        let health = model.max(iso);
        let cause = match (
            model == health && health != Health::Healthy,
            iso == health && health != Health::Healthy,
        ) {
            (true, true) => "both",
            (false, true) => "iso",
            _ => "model",
        };
        self.health = health;
        Transition {
            health,
            previous: current,
            zone,
            cause,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(policy: AlarmPolicy, scores: &[f64]) -> Vec<Health> {
        let mut s = AlarmState::new(policy);
        scores.iter().map(|x| s.update(*x, None).health).collect()
    }

    #[test]
    fn one_spike_is_not_an_alarm_but_three_of_five_are() {
        let h = run(AlarmPolicy::default(), &[0.2, 5.0, 0.3, 0.2, 0.1, 0.2]);
        assert!(h.iter().all(|x| *x == Health::Healthy), "{h:?}");
        let h = run(AlarmPolicy::default(), &[1.2, 0.3, 1.1, 1.5, 0.2]);
        assert_eq!(
            h,
            vec![
                Health::Healthy,
                Health::Healthy,
                Health::Healthy,
                Health::Warning,
                Health::Warning
            ]
        );
        let h = run(AlarmPolicy::default(), &[2.5, 3.0, 2.2]);
        assert_eq!(h[2], Health::Alarm);
    }

    #[test]
    fn hysteresis_holds_the_level_just_under_the_threshold() {
        // Warning entered, then scores hover at 0.9 (above 0.8 × 1.0): stays Warning; they
        // fall to 0.5: clears once fewer than 3 of the last 5 are above 0.8.
        let h = run(
            AlarmPolicy::default(),
            &[1.1, 1.2, 1.3, 0.9, 0.9, 0.9, 0.9, 0.5, 0.5, 0.5],
        );
        assert_eq!(h[2], Health::Warning);
        assert_eq!(&h[3..7], &[Health::Warning; 4]);
        assert_eq!(h[9], Health::Healthy);
        // Without the warning first, 0.9 never raises one.
        let h = run(AlarmPolicy::default(), &[0.9; 8]);
        assert!(h.iter().all(|x| *x == Health::Healthy));
    }

    #[test]
    fn iso_guard_raises_an_alarm_without_any_model_score() {
        let mut s = AlarmState::new(AlarmPolicy {
            iso_class: Some(MachineClass::I),
            ..AlarmPolicy::default()
        });
        let mut last = None;
        for _ in 0..3 {
            last = Some(s.update(0.1, Some(6.0)));
        }
        let t = last.expect("updated");
        assert_eq!(
            (t.health, t.zone, t.cause),
            (Health::Alarm, Some('D'), "iso")
        );
        assert_eq!(MachineClass::II.zone(2.0), 'B');
    }

    #[test]
    fn a_nan_score_counts_as_the_worst() {
        let h = run(AlarmPolicy::default(), &[f64::NAN; 3]);
        assert_eq!(h[2], Health::Alarm);
    }
}
