//! Frames waiting for a neighbour's MAC, as the kernel's ARP queue keeps
//! them: the first frames to a backend whose MAC is not known yet (just
//! after start, or after its entry went stale), and the first reply of a
//! flow whose next hop toward the client is not known yet (director mode),
//! are held until the ARP reply arrives instead of being dropped; the
//! client then sees no retransmission delay.
//!
//! Bounded and allocation-free after construction: [`SLOTS`] buffers of
//! [`FRAME`] bytes, at most [`PER_ADDRESS`] frames per address, each held
//! for at most [`HOLD_MS`]. Frames that do not fit, or expire, are the
//! caller's to count as dropped (`no_neighbor`). Pure: time is a parameter.

use std::net::Ipv4Addr;

/// Frames held at once, over all addresses.
pub const SLOTS: usize = 64;
/// Largest frame held (an Ethernet frame of a 1500-byte MTU fits).
pub const FRAME: usize = 2048;
/// Frames held per address (Linux's `unres_qlen` is about three frames).
pub const PER_ADDRESS: usize = 3;
/// How long a frame waits for its neighbour.
pub const HOLD_MS: u64 = 1000;

/// The segment a held frame leaves on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment {
    Front,
    Back,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    segment: Segment,
    ip: Ipv4Addr,
    at_ms: u64,
    len: usize,
}

/// Why a frame was not held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotHeld {
    TooLarge,
    AddressFull,
    QueueFull,
}

#[derive(Debug)]
pub struct HoldQueue {
    slots: [Option<Slot>; SLOTS],
    bufs: Box<[u8]>,
    held: usize,
}

impl Default for HoldQueue {
    fn default() -> Self {
        HoldQueue::new()
    }
}

impl HoldQueue {
    pub fn new() -> HoldQueue {
        HoldQueue {
            slots: [None; SLOTS],
            bufs: vec![0u8; SLOTS * FRAME].into_boxed_slice(),
            held: 0,
        }
    }

    /// A queue that holds nothing and allocates nothing (a placeholder
    /// while the real one is borrowed out).
    pub fn empty() -> HoldQueue {
        HoldQueue {
            slots: [None; SLOTS],
            bufs: Box::new([]),
            held: 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.held == 0
    }

    /// Frames held now.
    pub fn len(&self) -> usize {
        self.held
    }

    /// Keeps a copy of `frame` (complete but for its destination MAC) until
    /// `ip`'s MAC on `segment` is known.
    pub fn hold(
        &mut self,
        segment: Segment,
        ip: Ipv4Addr,
        frame: &[u8],
        now_ms: u64,
    ) -> Result<(), NotHeld> {
        if frame.len() > FRAME {
            return Err(NotHeld::TooLarge);
        }
        let same = self
            .slots
            .iter()
            .flatten()
            .filter(|s| s.segment == segment && s.ip == ip)
            .count();
        if same >= PER_ADDRESS {
            return Err(NotHeld::AddressFull);
        }
        let Some(i) = self.slots.iter().position(Option::is_none) else {
            return Err(NotHeld::QueueFull);
        };
        if self.bufs.len() < (i + 1) * FRAME {
            return Err(NotHeld::QueueFull);
        }
        self.bufs[i * FRAME..i * FRAME + frame.len()].copy_from_slice(frame);
        self.slots[i] = Some(Slot {
            segment,
            ip,
            at_ms: now_ms,
            len: frame.len(),
        });
        self.held += 1;
        Ok(())
    }

    /// `ip` is at `mac` on `segment`: every frame held for it gets `mac` as
    /// its destination and goes to `send`, oldest first. Returns how many.
    pub fn release(
        &mut self,
        segment: Segment,
        ip: Ipv4Addr,
        mac: [u8; 6],
        mut send: impl FnMut(&[u8]),
    ) -> usize {
        if self.held == 0 {
            return 0;
        }
        let mut sent = 0;
        loop {
            let oldest = self
                .slots
                .iter()
                .enumerate()
                .filter_map(|(i, s)| s.map(|s| (i, s)))
                .filter(|(_, s)| s.segment == segment && s.ip == ip)
                .min_by_key(|(_, s)| s.at_ms);
            let Some((i, s)) = oldest else { break };
            let buf = &mut self.bufs[i * FRAME..i * FRAME + s.len];
            if buf.len() >= 6 {
                buf[..6].copy_from_slice(&mac);
            }
            send(buf);
            self.slots[i] = None;
            self.held -= 1;
            sent += 1;
        }
        sent
    }

    /// Forgets frames held longer than [`HOLD_MS`]; returns how many.
    pub fn expire(&mut self, now_ms: u64) -> usize {
        if self.held == 0 {
            return 0;
        }
        let mut n = 0;
        for s in &mut self.slots {
            if s.is_some_and(|x| now_ms.saturating_sub(x.at_ms) >= HOLD_MS) {
                *s = None;
                n += 1;
            }
        }
        self.held -= n;
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 21);
    const B: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 22);
    const MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x21];

    fn frame(tag: u8) -> Vec<u8> {
        let mut f = vec![0u8; 60];
        f[59] = tag;
        f
    }

    #[test]
    fn held_frames_leave_oldest_first_with_the_learned_mac() {
        let mut q = HoldQueue::new();
        q.hold(Segment::Back, A, &frame(2), 20).expect("held");
        q.hold(Segment::Back, A, &frame(1), 10).expect("held");
        q.hold(Segment::Back, B, &frame(3), 15).expect("held");
        let mut out = Vec::new();
        assert_eq!(
            q.release(Segment::Back, A, MAC, |f| out.push(f.to_vec())),
            2
        );
        assert_eq!(out.iter().map(|f| f[59]).collect::<Vec<_>>(), vec![1, 2]);
        assert!(out.iter().all(|f| f[..6] == MAC));
        assert_eq!(q.len(), 1, "B's frame waits");
        // The same address on the other segment is another neighbour.
        assert_eq!(q.release(Segment::Front, B, MAC, |_| {}), 0);
        assert_eq!(q.release(Segment::Back, B, MAC, |_| {}), 1);
        assert!(q.is_empty());
    }

    #[test]
    fn bounded_per_address_and_overall() {
        let mut q = HoldQueue::new();
        for _ in 0..PER_ADDRESS {
            q.hold(Segment::Back, A, &frame(0), 0).expect("held");
        }
        assert_eq!(
            q.hold(Segment::Back, A, &frame(0), 0),
            Err(NotHeld::AddressFull)
        );
        let mut ip = u32::from(B);
        while q.len() < SLOTS {
            q.hold(Segment::Front, Ipv4Addr::from(ip), &frame(0), 0)
                .expect("held");
            ip += 1;
        }
        assert_eq!(
            q.hold(Segment::Front, Ipv4Addr::from(ip), &frame(0), 0),
            Err(NotHeld::QueueFull)
        );
        assert_eq!(
            HoldQueue::new().hold(Segment::Back, A, &vec![0; FRAME + 1], 0),
            Err(NotHeld::TooLarge)
        );
    }

    #[test]
    fn frames_expire_after_the_hold_time() {
        let mut q = HoldQueue::new();
        q.hold(Segment::Back, A, &frame(0), 100).expect("held");
        q.hold(Segment::Back, B, &frame(0), 600).expect("held");
        assert_eq!(q.expire(100 + HOLD_MS - 1), 0);
        assert_eq!(q.expire(100 + HOLD_MS), 1);
        assert_eq!(q.len(), 1);
        assert_eq!(
            q.release(Segment::Back, A, MAC, |_| {}),
            0,
            "A's frame is gone"
        );
        assert_eq!(q.expire(600 + HOLD_MS), 1);
        assert!(q.is_empty());
    }
}
