//! Load levels (the DVS service proxy's LVL_UNLOADED / LVL_LOADED /
//! LVL_SATURATED): a load in percent against a low- and a high-water mark,
//! with hysteresis so that a load hovering at a mark does not flap, and
//! reported only when the level changes (event-driven: less traffic than
//! periodic reports).
//!
//! | level now | load < low | low <= load < high | load >= high |
//! | --- | --- | --- | --- |
//! | (none) | UNLOADED | LOADED | SATURATED |
//! | UNLOADED | UNLOADED | LOADED if load >= low + hysteresis, else UNLOADED | SATURATED |
//! | LOADED | UNLOADED if load + hysteresis <= low, else LOADED | LOADED | SATURATED if load >= min(100, high + hysteresis), else LOADED |
//! | SATURATED | UNLOADED | LOADED if load + hysteresis <= high, else SATURATED | SATURATED |
//!
//! Precisely: leaving a level for the one next to it needs the load to be
//! `hysteresis` past the mark between them; a jump over two levels happens
//! at once.

pub use super::necp::Level;

/// Watermarks of one service (percent, 0..=100).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Marks {
    pub low: u8,
    pub high: u8,
    pub hysteresis: u8,
}

impl Default for Marks {
    fn default() -> Self {
        Marks {
            low: 30,
            high: 80,
            hysteresis: 5,
        }
    }
}

/// Where a load falls without hysteresis.
fn raw_level(m: Marks, load: u8) -> Level {
    if load >= m.high {
        Level::Saturated
    } else if load < m.low {
        Level::Unloaded
    } else {
        Level::Loaded
    }
}

/// One service's level tracker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LevelTracker {
    marks: Marks,
    level: Option<Level>,
}

impl LevelTracker {
    pub fn new(marks: Marks) -> LevelTracker {
        LevelTracker { marks, level: None }
    }

    pub fn level(&self) -> Option<Level> {
        self.level
    }

    /// Feeds a load sample (percent; above 100 counts as 100). Returns the
    /// new level when it changed (the first sample always "changes").
    pub fn update(&mut self, load: u8) -> Option<Level> {
        let load = load.min(100);
        let m = self.marks;
        let raw = raw_level(m, load);
        let next = match (self.level, raw) {
            (None, r) => r,
            (Some(cur), r) if cur == r => cur,
            // Adjacent moves need the hysteresis margin past the mark.
            (Some(Level::Unloaded), Level::Loaded) => {
                if load >= m.low.saturating_add(m.hysteresis) {
                    Level::Loaded
                } else {
                    Level::Unloaded
                }
            }
            (Some(Level::Loaded), Level::Unloaded) => {
                if load.saturating_add(m.hysteresis) <= m.low {
                    Level::Unloaded
                } else {
                    Level::Loaded
                }
            }
            (Some(Level::Loaded), Level::Saturated) => {
                if load >= m.high.saturating_add(m.hysteresis).min(100) {
                    Level::Saturated
                } else {
                    Level::Loaded
                }
            }
            (Some(Level::Saturated), Level::Loaded) => {
                if load.saturating_add(m.hysteresis) <= m.high {
                    Level::Loaded
                } else {
                    Level::Saturated
                }
            }
            // Two levels at once: no hysteresis.
            (Some(_), r) => r,
        };
        if self.level == Some(next) {
            return None;
        }
        self.level = Some(next);
        Some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t() -> LevelTracker {
        LevelTracker::new(Marks {
            low: 30,
            high: 80,
            hysteresis: 5,
        })
    }

    #[test]
    fn first_sample_is_always_reported() {
        assert_eq!(t().update(0), Some(Level::Unloaded));
        assert_eq!(t().update(50), Some(Level::Loaded));
        assert_eq!(t().update(80), Some(Level::Saturated));
    }

    #[test]
    fn unchanged_level_is_not_reported_again() {
        let mut l = t();
        l.update(50);
        for load in [40, 60, 79, 30] {
            assert_eq!(l.update(load), None, "load {load}");
        }
        assert_eq!(l.level(), Some(Level::Loaded));
    }

    #[test]
    fn rising_into_loaded_needs_the_margin() {
        let mut l = t();
        l.update(10);
        assert_eq!(l.update(32), None);
        assert_eq!(l.update(35), Some(Level::Loaded));
    }

    #[test]
    fn falling_to_unloaded_needs_the_margin() {
        let mut l = t();
        l.update(50);
        assert_eq!(l.update(27), None);
        assert_eq!(l.update(25), Some(Level::Unloaded));
    }

    #[test]
    fn saturation_needs_high_plus_margin_from_loaded() {
        let mut l = t();
        l.update(50);
        assert_eq!(l.update(82), None);
        assert_eq!(l.update(85), Some(Level::Saturated));
    }

    #[test]
    fn leaving_saturation_needs_high_minus_margin() {
        let mut l = t();
        l.update(95);
        assert_eq!(l.update(77), None);
        assert_eq!(l.update(75), Some(Level::Loaded));
    }

    #[test]
    fn jumps_over_two_levels_happen_at_once() {
        let mut l = t();
        l.update(0);
        assert_eq!(l.update(100), Some(Level::Saturated));
        assert_eq!(l.update(0), Some(Level::Unloaded));
    }

    #[test]
    fn saturation_with_high_at_100_is_reachable() {
        let mut l = LevelTracker::new(Marks {
            low: 10,
            high: 100,
            hysteresis: 5,
        });
        l.update(50);
        assert_eq!(l.update(100), Some(Level::Saturated));
    }
}
