//! The TUN device through which locally served flows enter the node's own
//! stack. The dataplane writes the IPv4 packet (Ethernet header stripped);
//! the kernel receives it as if it had arrived on this device, delivers it
//! to the service bound on the VIP, and the service's replies leave through
//! the front NIC by the ordinary routing table, straight to the client.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open TUN device. The interface disappears when this is dropped (it is
/// not persistent).
pub struct Tun {
    file: File,
    name: String,
}

impl Tun {
    /// Creates (or attaches to) TUN device `name`, without packet info
    /// headers, non-blocking.
    pub fn open(name: &str) -> io::Result<Tun> {
        let c = CString::new(name)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in name"))?;
        let bytes = c.as_bytes();
        if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad interface name {name:?}"),
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| io::Error::new(e.kind(), format!("open /dev/net/tun: {e}")))?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TUN | IFF_NO_PI,
            _pad: [0; 22],
        };
        req.name[..bytes.len()].copy_from_slice(bytes);
        // SAFETY: TUNSETIFF takes a struct ifreq, which IfReq mirrors.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("TUNSETIFF {name}: {e}")));
        }
        Ok(Tun {
            file,
            name: name.to_string(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Hands one IPv4 packet to the kernel. Returns false if the kernel did
    /// not take it (queue full); the caller counts it.
    pub fn write_packet(&self, packet: &[u8]) -> bool {
        // SAFETY: writing a valid buffer to our descriptor.
        let r = unsafe { libc::write(self.file.as_raw_fd(), packet.as_ptr().cast(), packet.len()) };
        r == packet.len() as isize
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
