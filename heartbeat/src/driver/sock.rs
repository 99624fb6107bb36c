//! Socket and interface plumbing (Linux). Everything here is namespace-
//! correct: interface facts come from ioctls on a socket of the calling
//! thread's network namespace, never from /sys.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsRawFd;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::arp::Mac;
use crate::vrrp::wire::{IP_PROTO_VRRP, VRRP_GROUP_V4};

pub fn ifindex(name: &str) -> io::Result<u32> {
    nix::net::if_::if_nametoindex(name).map_err(io::Error::from)
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    let b = name.as_bytes();
    if b.len() >= r.ifr_name.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    for (d, s) in r.ifr_name.iter_mut().zip(b) {
        *d = *s as libc::c_char;
    }
    Ok(r)
}

fn ioctl(name: &str, req: libc::Ioctl) -> io::Result<libc::ifreq> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, None)?;
    let mut r = ifreq(name)?;
    // SAFETY: a valid fd, a request that reads/writes one ifreq, and a
    // pointer to an ifreq that lives across the call.
    let rc = unsafe { libc::ioctl(s.as_raw_fd(), req, &mut r as *mut libc::ifreq) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

/// The interface's hardware address.
pub fn interface_mac(name: &str) -> io::Result<Mac> {
    let r = ioctl(name, libc::SIOCGIFHWADDR)?;
    // SAFETY: SIOCGIFHWADDR filled the hwaddr member of the union.
    let sa = unsafe { r.ifr_ifru.ifru_hwaddr };
    let mut m = [0u8; 6];
    for (d, s) in m.iter_mut().zip(sa.sa_data.iter()) {
        *d = *s as u8;
    }
    Ok(m)
}

/// Administratively up and with carrier (IFF_UP and IFF_RUNNING).
pub fn interface_running(name: &str) -> bool {
    match ioctl(name, libc::SIOCGIFFLAGS) {
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        Ok(r) => {
            let f = i32::from(unsafe { r.ifr_ifru.ifru_flags });
            f & libc::IFF_UP != 0 && f & libc::IFF_RUNNING != 0
        }
        Err(_) => false,
    }
}

/// The interface's primary IPv4 address (SIOCGIFADDR returns the primary).
pub fn interface_ipv4(name: &str) -> io::Result<Ipv4Addr> {
    let r = ioctl(name, libc::SIOCGIFADDR)?;
    // SAFETY: SIOCGIFADDR filled the addr member with a sockaddr_in.
    let sa = unsafe { r.ifr_ifru.ifru_addr };
    let sin: libc::sockaddr_in = unsafe { std::mem::transmute_copy(&sa) };
    Ok(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
}

/// A raw IPv4 socket for protocol 112 on one interface: joined to
/// 224.0.0.18, our own multicast not looped back, the IP header written by
/// us (TTL 255, our primary as source), non-blocking.
pub fn vrrp_socket(ifname: &str, ifindex: u32, primary: Ipv4Addr) -> io::Result<Socket> {
    let s = Socket::new(
        Domain::IPV4,
        Type::RAW,
        Some(Protocol::from(i32::from(IP_PROTO_VRRP))),
    )?;
    s.bind_device(Some(ifname.as_bytes()))?;
    s.set_header_included_v4(true)?;
    s.set_multicast_loop_v4(false)?;
    s.set_multicast_if_v4(&primary)?;
    s.set_multicast_ttl_v4(255)?;
    s.join_multicast_v4_n(
        &VRRP_GROUP_V4,
        &socket2::InterfaceIndexOrAddress::Index(ifindex),
    )?;
    s.set_nonblocking(true)?;
    Ok(s)
}

pub fn send_ip(s: &Socket, packet: &[u8], dst: Ipv4Addr) -> io::Result<usize> {
    s.send_to(packet, &SockAddr::from(SocketAddrV4::new(dst, 0)))
}

/// An AF_PACKET raw socket bound to `ifindex` for `ethertype`.
pub fn packet_socket(ifindex: u32, ethertype: u16) -> io::Result<Socket> {
    let proto = i32::from(ethertype.to_be());
    let s = Socket::new(Domain::PACKET, Type::RAW, Some(Protocol::from(proto)))?;
    // SAFETY: sockaddr_ll is plain old data; we fill the fields bind needs.
    let mut ll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    ll.sll_family = libc::AF_PACKET as u16;
    ll.sll_protocol = ethertype.to_be();
    ll.sll_ifindex = ifindex as i32;
    let rc = unsafe {
        libc::bind(
            s.as_raw_fd(),
            &ll as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(s)
}

/// Sends a whole Ethernet frame on a bound packet socket.
pub fn send_frame(s: &Socket, _ifindex: u32, _dst: Mac, frame: &[u8]) -> io::Result<usize> {
    // A bound AF_PACKET socket sends on its interface; the frame carries
    // its own Ethernet header.
    s.send(frame)
}

/// UDP socket for membership heartbeats.
pub fn member_socket(
    ifname: &str,
    ifindex: u32,
    primary: Ipv4Addr,
    port: u16,
    group: Option<Ipv4Addr>,
) -> io::Result<Socket> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.bind_device(Some(ifname.as_bytes()))?;
    s.bind(&SockAddr::from(SocketAddrV4::new(
        Ipv4Addr::UNSPECIFIED,
        port,
    )))?;
    if let Some(g) = group {
        s.join_multicast_v4_n(&g, &socket2::InterfaceIndexOrAddress::Index(ifindex))?;
        s.set_multicast_loop_v4(false)?;
        s.set_multicast_if_v4(&primary)?;
        s.set_multicast_ttl_v4(1)?;
    }
    s.set_nonblocking(true)?;
    Ok(s)
}

/// Receives into `buf`; `Ok(None)` when nothing is queued.
pub fn recv_from(s: &Socket, buf: &mut [u8]) -> io::Result<Option<(usize, Option<Ipv4Addr>)>> {
    // SAFETY: MaybeUninit<u8> has u8's layout; recv only writes.
    let ubuf = unsafe { &mut *(buf as *mut [u8] as *mut [std::mem::MaybeUninit<u8>]) };
    match s.recv_from(ubuf) {
        Ok((n, a)) => Ok(Some((n, a.as_socket_ipv4().map(|a| *a.ip())))),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
        Err(e) => Err(e),
    }
}

/// Tries SCHED_FIFO (priority `prio`) for the calling thread; returns
/// whether it worked (needs root or CAP_SYS_NICE and an RT budget).
pub fn try_realtime(prio: i32) -> bool {
    let p = libc::sched_param {
        sched_priority: prio,
    };
    // SAFETY: plain syscall on the calling thread with a valid param.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &p) == 0 }
}
