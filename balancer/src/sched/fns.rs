//! First non-saturated: packs load onto the first backends so that the
//! last ones stay idle and can be retired (scaled down).

use super::{Algorithm, BackendState, Flow, SchedRng, SchedulerKind, min_ratio};

/// The first eligible backend, in configuration order, whose connections
/// (active + inactive) are below its `high_water` mark (0 = never
/// saturated). When every eligible backend is saturated, the one with the
/// smallest `connections / high_water`, so that overload spreads in
/// proportion to the marks instead of piling onto the first.
#[derive(Clone, Copy, Debug, Default)]
pub struct FirstNonSaturated;

impl Algorithm for FirstNonSaturated {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Fns
    }

    fn pick(&mut self, backends: &[BackendState], _: &Flow, _: &mut SchedRng) -> Option<usize> {
        backends
            .iter()
            .position(|b| b.is_eligible() && (b.high_water == 0 || b.conns() < b.high_water))
            .or_else(|| {
                min_ratio(backends, |b| {
                    (u64::from(b.conns()), u64::from(b.high_water))
                })
            })
    }

    fn reset(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;
    use super::*;

    fn hw(mark: u32) -> BackendState {
        BackendState {
            high_water: mark,
            ..up(1)
        }
    }

    /// Connections that stay open: the first server fills to its mark, then
    /// the second, then the third; beyond all marks, in proportion.
    #[test]
    fn fns_packs_in_order_up_to_each_high_water_mark() {
        let mut b = [hw(2), hw(3), hw(1)];
        let mut s = FirstNonSaturated;
        let mut seq = Vec::new();
        for _ in 0..12 {
            let i = pick1(&mut s, &b, 0).expect("eligible");
            b[i].active_conns += 1;
            seq.push(i);
        }
        // 0 0 | 1 1 1 | 2 | then the smallest conns / mark, first on ties.
        assert_eq!(&seq[..6], &[0, 0, 1, 1, 1, 2]);
        let conns: Vec<u32> = b.iter().map(|x| x.active_conns).collect();
        // 12 connections over marks 2:3:1 -> 4:6:2 exactly
        assert_eq!(conns, [4, 6, 2], "{seq:?}");
    }

    #[test]
    fn fns_returns_to_the_first_server_when_it_has_room_again() {
        let mut b = [hw(2), hw(2), hw(2)];
        b[0].active_conns = 2;
        b[1].inactive_conns = 1;
        let mut s = FirstNonSaturated;
        assert_eq!(pick1(&mut s, &b, 0), Some(1));
        b[0].active_conns = 1;
        assert_eq!(pick1(&mut s, &b, 0), Some(0));
        // down or drained servers are passed over even with room
        b[0].available = false;
        assert_eq!(pick1(&mut s, &b, 0), Some(1));
        b[1].weight = 0;
        assert_eq!(pick1(&mut s, &b, 0), Some(2));
    }

    #[test]
    fn fns_without_marks_sends_everything_to_the_first_eligible() {
        let b = [down(1), up(1), up(1)];
        assert_eq!(counts(&mut FirstNonSaturated, &b, 50), [0, 50, 0]);
    }
}
