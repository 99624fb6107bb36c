//! Health to scheduler weight (feedbackd, Kerr 2002, equation 1):
//!
//! ```text
//! w_t = a * max(1, h) + (1 - a) * w_(t-1),   0 <= a <= 1
//! ```
//!
//! Health values straight into the weight table made weights swing between
//! 1 and 100 as servers alternated between full and no load; the weighted
//! average damps that. `max(1, h)` keeps the average above zero, so a
//! server that reported 0 comes back gradually; a report of 0 itself
//! drains the server at once (weight 0: no new flows, existing ones
//! finish) for as long as it lasts.

/// One server's smoothed weight.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Smoother {
    alpha: f64,
    /// `w_(t-1)`; `None` before the first report.
    prev: Option<f64>,
}

/// The weight a server gets before its first keepalive answer: full
/// (NECP health 100), as the server just said START.
pub const INITIAL_WEIGHT: u32 = 100;

impl Smoother {
    /// `alpha` is clamped into 0..=1.
    pub fn new(alpha: f64) -> Smoother {
        Smoother {
            alpha: if alpha.is_nan() {
                1.0
            } else {
                alpha.clamp(0.0, 1.0)
            },
            prev: None,
        }
    }

    /// Feeds one health report (0..=100, larger values are taken as 100)
    /// and returns the weight to publish: 0 when `health` is 0, else the
    /// smoothed value rounded, 1..=100. The first report starts from
    /// [`INITIAL_WEIGHT`].
    pub fn update(&mut self, health: u8) -> u32 {
        let h = f64::from(health.min(100)).max(1.0);
        let prev = self.prev.unwrap_or(f64::from(INITIAL_WEIGHT));
        let w = self.alpha * h + (1.0 - self.alpha) * prev;
        self.prev = Some(w);
        if health == 0 {
            0
        } else {
            (w.round() as u32).clamp(1, 100)
        }
    }

    /// The current smoothed value (before rounding).
    pub fn value(&self) -> f64 {
        self.prev.unwrap_or(f64::from(INITIAL_WEIGHT))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alpha_one_follows_health_exactly() {
        let mut s = Smoother::new(1.0);
        assert_eq!(s.update(40), 40);
        assert_eq!(s.update(90), 90);
        assert_eq!(s.update(1), 1);
    }

    #[test]
    fn half_alpha_averages_with_the_previous_weight() {
        let mut s = Smoother::new(0.5);
        // 0.5 * 20 + 0.5 * 100 = 60
        assert_eq!(s.update(20), 60);
        // 0.5 * 20 + 0.5 * 60 = 40
        assert_eq!(s.update(20), 40);
        // 0.5 * 100 + 0.5 * 40 = 70
        assert_eq!(s.update(100), 70);
    }

    #[test]
    fn health_zero_drains_at_once_and_recovers_gradually() {
        let mut s = Smoother::new(0.5);
        assert_eq!(s.update(0), 0);
        // The average went 0.5 * max(1, 0) + 0.5 * 100 = 50.5.
        assert!((s.value() - 50.5).abs() < 1e-9);
        // Back to 100: 0.5 * 100 + 0.5 * 50.5 = 75.25 -> 75, not 100.
        assert_eq!(s.update(100), 75);
    }

    #[test]
    fn weight_never_falls_to_zero_while_health_is_positive() {
        let mut s = Smoother::new(0.9);
        for _ in 0..100 {
            assert!(s.update(1) >= 1);
        }
        assert_eq!(s.update(1), 1);
    }

    #[test]
    fn alpha_zero_keeps_the_initial_weight_and_bad_alpha_is_clamped() {
        let mut s = Smoother::new(0.0);
        assert_eq!(s.update(5), 100);
        let mut s = Smoother::new(7.0);
        assert_eq!(s.update(5), 5);
        let mut s = Smoother::new(f64::NAN);
        assert_eq!(s.update(5), 5);
    }
}
