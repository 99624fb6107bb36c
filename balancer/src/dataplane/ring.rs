//! AF_PACKET with TPACKET_V2 RX and TX rings: the batched frame I/O of the
//! forwarding path.
//!
//! Why not pnet: it does one `poll` + `recvfrom` per received frame and one
//! `poll` + `sendto` per sent frame (CRATES.md). Here the kernel writes
//! received frames into a shared ring and the dataplane walks it without a
//! syscall per frame; sent frames are written into a TX ring and handed to
//! the kernel with one `send` per batch.
//!
//! The socket is bound with `ETH_P_ALL` to one interface, so it sits on the
//! device's `ptype_all` list: it sees every frame *before* the nftables
//! `netdev` ingress hook, which is what lets the kernel be kept off VIP
//! traffic while the dataplane still reads it. Frames the host sends itself
//! are ignored (`PACKET_IGNORE_OUTGOING`).
//!
//! Layout of a TPACKET_V2 slot (linux/if_packet.h): a `tpacket2_hdr`, then
//! (RX) a `sockaddr_ll`, then the frame at `tp_mac`; (TX) the frame at
//! `TPACKET_ALIGN(sizeof(tpacket2_hdr))`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering, fence};

/// Metadata of one received frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxMeta {
    /// Length of the frame on the wire.
    pub len: usize,
    /// The kernel marked the L4 checksum as partial (CHECKSUM_PARTIAL: veth
    /// checksum offload). It must be completed before any incremental update.
    pub csum_not_ready: bool,
    /// The kernel had stripped an 802.1Q tag into metadata (VLAN_VALID).
    pub vlan_tagged: bool,
    /// `PACKET_HOST`, `PACKET_BROADCAST`, `PACKET_MULTICAST`, `PACKET_OTHERHOST`.
    pub pkttype: u8,
}

/// Received frames, in batches. The dataplane is written against these two
/// traits so the AF_PACKET rings can be swapped for AF_XDP.
pub trait FrameRx {
    /// Hands each ready received frame (up to `budget`) to `f` as a mutable
    /// slice it may rewrite in place, then returns the slot to the kernel.
    /// A frame truncated by the slot size comes with `meta.len` larger than
    /// the slice.
    fn recv_batch(&mut self, budget: usize, f: &mut dyn FnMut(&mut [u8], RxMeta)) -> usize;
    /// The descriptor to poll for readability.
    fn fd(&self) -> RawFd;
}

/// Frames to send, queued and handed to the kernel in batches.
pub trait FrameTx {
    /// Queues a frame; false when the ring is full or the frame does not fit
    /// a slot (the caller counts the drop).
    fn send(&mut self, frame: &[u8]) -> bool;
    /// Hands queued frames to the kernel.
    fn flush(&mut self) -> io::Result<()>;
}

const TPACKET_V2: libc::c_int = 1;
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
const TP_STATUS_KERNEL: u32 = 0;
const TP_STATUS_USER: u32 = 1;
const TP_STATUS_CSUMNOTREADY: u32 = 1 << 3;
const TP_STATUS_VLAN_VALID: u32 = 1 << 4;
const TP_STATUS_SEND_REQUEST: u32 = 1;
const TP_STATUS_SENDING: u32 = 2;
const TP_STATUS_WRONG_FORMAT: u32 = 4;
/// `TPACKET_ALIGN(sizeof(struct tpacket2_hdr))`.
const HDR_LEN: usize = 32;
/// Offset of `sll_pkttype` in the `sockaddr_ll` that follows the header.
const SLL_PKTTYPE_OFF: usize = HDR_LEN + 10;

/// `struct tpacket2_hdr` field offsets.
mod field {
    pub const STATUS: usize = 0;
    pub const LEN: usize = 4;
    pub const SNAPLEN: usize = 8;
    pub const MAC: usize = 12;
}

/// Ring geometry: slots of 2048 bytes hold a 1514-byte frame plus headers.
pub const FRAME_SIZE: usize = 2048;
const BLOCK_SIZE: usize = 1 << 16;
const PER_BLOCK: usize = BLOCK_SIZE / FRAME_SIZE;

struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len come from a successful mmap and are unmapped once.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

impl Mapping {
    fn slot(&self, idx: usize) -> *mut u8 {
        debug_assert!((idx + 1) * FRAME_SIZE <= self.len);
        // SAFETY (for callers): idx < frames of the ring, so the slot lies in the mapping.
        unsafe { self.ptr.as_ptr().add(idx * FRAME_SIZE) }
    }
}

fn status(slot: *mut u8) -> &'static AtomicU32 {
    // SAFETY: the status word is 4-aligned at the slot start (slots are
    // FRAME_SIZE-aligned within a page-aligned mapping) and shared with the
    // kernel, hence atomic access. The mapping outlives every use (owned by
    // the ring that calls this).
    unsafe { &*(slot.add(field::STATUS) as *const AtomicU32) }
}

fn read_u32(slot: *mut u8, off: usize) -> u32 {
    // SAFETY: off is a field offset within the 32-byte header.
    unsafe { std::ptr::read_volatile(slot.add(off) as *const u32) }
}

fn read_u16(slot: *mut u8, off: usize) -> u16 {
    // SAFETY: as above.
    unsafe { std::ptr::read_volatile(slot.add(off) as *const u16) }
}

fn check(ret: libc::c_int, what: &str) -> io::Result<()> {
    if ret < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

fn setsockopt<T>(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    val: &T,
    what: &str,
) -> io::Result<()> {
    // SAFETY: val points to a live T of the given size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (val as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    check(r, what)
}

/// Interface index of `name`, or an error naming it.
pub fn ifindex(name: &str) -> io::Result<u32> {
    let c = std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in name"))?;
    // SAFETY: c is a valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no interface named {name:?}"),
        ));
    }
    Ok(i)
}

/// An AF_PACKET socket on one interface with one ring mapped. `protocol` 0
/// makes a send-only socket that receives nothing (so the TX socket does not
/// get a copy of every frame).
fn open_ring(
    ifname: &str,
    protocol: u16,
    ring_opt: libc::c_int,
    frames: usize,
) -> io::Result<(OwnedFd, Mapping, usize)> {
    let ifindex = ifindex(ifname)?;
    let proto_be = protocol.to_be();
    // SAFETY: plain socket(2).
    let raw = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            proto_be as libc::c_int,
        )
    };
    check(raw, "socket(AF_PACKET)")?;
    // SAFETY: raw is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let s = fd.as_raw_fd();
    setsockopt(
        s,
        libc::SOL_PACKET,
        libc::PACKET_VERSION,
        &TPACKET_V2,
        "PACKET_VERSION",
    )?;
    let one: libc::c_int = 1;
    if protocol != 0 {
        setsockopt(
            s,
            libc::SOL_PACKET,
            PACKET_IGNORE_OUTGOING,
            &one,
            "PACKET_IGNORE_OUTGOING",
        )?;
    } else {
        // Frames we send skip the qdisc: the ring is our queue.
        setsockopt(
            s,
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            &one,
            "PACKET_QDISC_BYPASS",
        )?;
    }
    let blocks = frames.div_ceil(PER_BLOCK).max(1);
    let req = libc::tpacket_req {
        tp_block_size: BLOCK_SIZE as u32,
        tp_block_nr: blocks as u32,
        tp_frame_size: FRAME_SIZE as u32,
        tp_frame_nr: (blocks * PER_BLOCK) as u32,
    };
    setsockopt(s, libc::SOL_PACKET, ring_opt, &req, "PACKET_RX/TX_RING")?;
    let len = blocks * BLOCK_SIZE;
    // SAFETY: mapping the ring just configured on s; checked below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            s,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::other(format!(
            "mmap ring on {ifname}: {}",
            io::Error::last_os_error()
        )));
    }
    let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
    let map = Mapping { ptr, len };
    // SAFETY: sockaddr_ll is plain data; zeroed is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto_be;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: sll is a valid sockaddr_ll for bind(2).
    let r = unsafe {
        libc::bind(
            s,
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    check(r, "bind(AF_PACKET)")?;
    Ok((fd, map, blocks * PER_BLOCK))
}

/// The receive ring of one interface (TPACKET_V2, `ETH_P_ALL`).
pub struct RxRing {
    fd: OwnedFd,
    map: Mapping,
    frames: usize,
    next: usize,
}

// SAFETY: the mapping is owned by this value and only touched through &mut self.
unsafe impl Send for RxRing {}

impl RxRing {
    /// Opens a receive ring of at least `frames` slots on `ifname`.
    pub fn open(ifname: &str, frames: usize) -> io::Result<RxRing> {
        let (fd, map, frames) =
            open_ring(ifname, libc::ETH_P_ALL as u16, libc::PACKET_RX_RING, frames)?;
        Ok(RxRing {
            fd,
            map,
            frames,
            next: 0,
        })
    }
}

impl RxRing {
    /// Makes the interface accept frames to `mac` (the cluster MAC: a
    /// multicast one, or in director mode a secondary unicast one) for as
    /// long as this socket is open (PACKET_ADD_MEMBERSHIP).
    pub fn add_membership(&self, ifname: &str, mac: [u8; 6]) -> io::Result<()> {
        let kind = if mac[0] & 1 == 1 {
            libc::PACKET_MR_MULTICAST
        } else {
            libc::PACKET_MR_UNICAST
        };
        let mut mr = libc::packet_mreq {
            mr_ifindex: ifindex(ifname)? as i32,
            mr_type: kind as u16,
            mr_alen: 6,
            mr_address: [0; 8],
        };
        mr.mr_address[..6].copy_from_slice(&mac);
        setsockopt(
            self.fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_ADD_MEMBERSHIP,
            &mr,
            "PACKET_ADD_MEMBERSHIP",
        )
    }
}

impl RxRing {
    /// Frames the kernel dropped because the ring was full, since the last
    /// call (PACKET_STATISTICS resets on read).
    pub fn take_drops(&self) -> u64 {
        let mut st = libc::tpacket_stats {
            tp_packets: 0,
            tp_drops: 0,
        };
        let mut len = std::mem::size_of::<libc::tpacket_stats>() as libc::socklen_t;
        // SAFETY: st and len are valid for getsockopt(PACKET_STATISTICS).
        let r = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                (&mut st as *mut libc::tpacket_stats).cast(),
                &mut len,
            )
        };
        if r < 0 { 0 } else { u64::from(st.tp_drops) }
    }
}

impl FrameRx for RxRing {
    fn recv_batch(&mut self, budget: usize, f: &mut dyn FnMut(&mut [u8], RxMeta)) -> usize {
        let mut n = 0;
        while n < budget {
            let slot = self.map.slot(self.next);
            let st = status(slot);
            let stat = st.load(Ordering::Acquire);
            if stat & TP_STATUS_USER == 0 {
                break;
            }
            let len = read_u32(slot, field::LEN) as usize;
            let mac = (read_u16(slot, field::MAC) as usize).min(FRAME_SIZE);
            let snap = (read_u32(slot, field::SNAPLEN) as usize).min(FRAME_SIZE - mac);
            // SAFETY: offset within the slot's sockaddr_ll.
            let pkttype = unsafe { *slot.add(SLL_PKTTYPE_OFF) };
            // SAFETY: [mac, mac+snap) lies within this slot (clamped above),
            // which the kernel handed to us (TP_STATUS_USER) until we return it.
            let frame = unsafe { std::slice::from_raw_parts_mut(slot.add(mac), snap) };
            let meta = RxMeta {
                len,
                csum_not_ready: stat & TP_STATUS_CSUMNOTREADY != 0,
                vlan_tagged: stat & TP_STATUS_VLAN_VALID != 0,
                pkttype,
            };
            f(frame, meta);
            st.store(TP_STATUS_KERNEL, Ordering::Release);
            self.next = (self.next + 1) % self.frames;
            n += 1;
        }
        n
    }

    fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// The transmit ring of one interface (TPACKET_V2, send-only socket).
pub struct TxRing {
    fd: OwnedFd,
    map: Mapping,
    frames: usize,
    next: usize,
    pending: usize,
}

// SAFETY: as for RxRing.
unsafe impl Send for TxRing {}

impl TxRing {
    pub fn open(ifname: &str, frames: usize) -> io::Result<TxRing> {
        let (fd, map, frames) = open_ring(ifname, 0, libc::PACKET_TX_RING, frames)?;
        Ok(TxRing {
            fd,
            map,
            frames,
            next: 0,
            pending: 0,
        })
    }

    /// Largest frame a slot holds.
    pub const MAX_FRAME: usize = FRAME_SIZE - HDR_LEN;
}

impl FrameTx for TxRing {
    fn send(&mut self, frame: &[u8]) -> bool {
        if frame.len() > Self::MAX_FRAME {
            return false;
        }
        let slot = self.map.slot(self.next);
        let st = status(slot);
        let stat = st.load(Ordering::Acquire);
        if stat & (TP_STATUS_SEND_REQUEST | TP_STATUS_SENDING) != 0 {
            // The kernel has not sent this slot yet: kick it and report full.
            let _ = self.flush();
            return false;
        }
        // AVAILABLE, or WRONG_FORMAT (a frame the kernel refused earlier,
        // reclaimed by overwriting it).
        let _ = TP_STATUS_WRONG_FORMAT;
        // SAFETY: the slot is ours and the frame fits after the header.
        unsafe {
            std::ptr::copy_nonoverlapping(frame.as_ptr(), slot.add(HDR_LEN), frame.len());
            std::ptr::write_volatile(slot.add(field::LEN) as *mut u32, frame.len() as u32);
        }
        fence(Ordering::Release);
        st.store(TP_STATUS_SEND_REQUEST, Ordering::Release);
        self.next = (self.next + 1) % self.frames;
        self.pending += 1;
        true
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.pending == 0 {
            return Ok(());
        }
        self.pending = 0;
        // SAFETY: send(2) with no buffer kicks the TX ring.
        let r = unsafe { libc::send(self.fd.as_raw_fd(), std::ptr::null(), 0, libc::MSG_DONTWAIT) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::WouldBlock {
                return Err(e);
            }
        }
        Ok(())
    }
}
