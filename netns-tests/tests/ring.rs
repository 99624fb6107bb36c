//! The AF_PACKET TPACKET_V2 rings of the dataplane, on real veths in
//! namespaces: frames sent through the TX ring arrive whole through the RX
//! ring, and the kernel's partial-checksum mark is reported.

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use balancer::dataplane::ring::{FrameRx, FrameTx, RxMeta, RxRing, TxRing};
use netns_tests::topo::{Host, Testbed};

type Frames = Vec<(Vec<u8>, RxMeta)>;

/// Collects frames from an RX ring inside a namespace until `stop`.
fn collect(
    host: &Host,
    ifname: &'static str,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Result<Frames>> {
    let ready = Arc::new(AtomicBool::new(false));
    let r2 = ready.clone();
    let h = host.spawn_in_ns(move || {
        let mut rx = RxRing::open(ifname, 2048).expect("rx ring");
        r2.store(true, Ordering::SeqCst);
        let mut got = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            if rx.recv_batch(usize::MAX, &mut |f, m| got.push((f.to_vec(), m))) == 0 {
                std::thread::sleep(Duration::from_micros(100));
            }
        }
        rx.recv_batch(10_000, &mut |f, m| got.push((f.to_vec(), m)));
        got
    });
    let t0 = Instant::now();
    while !ready.load(Ordering::SeqCst) && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
    }
    h
}

#[test]
fn frames_sent_on_the_tx_ring_arrive_whole_on_the_rx_ring() -> Result<()> {
    let tb = Testbed::new("ring-roundtrip")?;
    let lan = tb.bridge("l")?;
    let a = tb.host("a")?;
    let b = tb.host("b")?;
    tb.link(&a, "eth0", &lan, &[])?;
    tb.link(&b, "eth0", &lan, &[])?;
    let stop = Arc::new(AtomicBool::new(false));
    let rx = collect(&a, "eth0", stop.clone());
    let sent = Arc::new(Mutex::new(0usize));
    let s2 = sent.clone();
    b.in_ns(move || {
        let mut tx = TxRing::open("eth0", 128).expect("tx ring");
        let mut n = 0;
        for i in 0..1000u32 {
            // Broadcast, local experimental ethertype 0x88b5, a counter, padding.
            let mut f = vec![0xff; 6];
            f.extend_from_slice(&[2, 0, 0, 0, 0, 9, 0x88, 0xb5]);
            f.extend_from_slice(&i.to_be_bytes());
            f.resize(60 + (i as usize % 1400), (i % 251) as u8);
            while !tx.send(&f) {
                std::thread::sleep(Duration::from_micros(200));
            }
            n += 1;
            if n % 32 == 0 {
                tx.flush().expect("flush");
            }
        }
        tx.flush().expect("flush");
        assert!(
            !tx.send(&vec![0u8; TxRing::MAX_FRAME + 1]),
            "an oversized frame was queued"
        );
        *s2.lock().expect("lock") = n;
    })?;
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let got = rx.join().expect("join")?;
    let ours: Vec<_> = got
        .iter()
        .filter(|(f, _)| f.len() >= 18 && f[12..14] == [0x88, 0xb5])
        .collect();
    assert_eq!(
        ours.len(),
        *sent.lock().expect("lock"),
        "frames lost or duplicated"
    );
    for (i, (f, m)) in ours.iter().enumerate() {
        let idx = u32::from_be_bytes([f[14], f[15], f[16], f[17]]);
        assert_eq!(idx as usize, i, "frames reordered");
        assert_eq!(f.len(), 60 + (i % 1400));
        assert_eq!(m.len, f.len());
        assert!(
            f[18..].iter().all(|b| *b == (i % 251) as u8),
            "frame {i} corrupted"
        );
    }
    Ok(())
}

/// With checksum offload on (the veth default) a UDP datagram arrives with
/// a partial checksum and the ring says so; with it off it does not.
#[test]
fn partial_checksum_is_reported_only_with_tx_offload_on() -> Result<()> {
    let tb = Testbed::new("ring-csum")?;
    let lan = tb.bridge("l")?;
    let a = tb.host("a")?;
    let b = tb.host("b")?;
    tb.link(&a, "eth0", &lan, &["198.18.0.1/24"])?;
    tb.link(&b, "eth0", &lan, &["198.18.0.2/24"])?;
    b.run(&["ping", "-c1", "-W2", "198.18.0.1"])?;
    let mut seen = Vec::new();
    for offload in ["on", "off"] {
        b.run(&["ethtool", "-K", "eth0", "tx", offload])?;
        let stop = Arc::new(AtomicBool::new(false));
        let rx = collect(&a, "eth0", stop.clone());
        b.in_ns(|| {
            let s = UdpSocket::bind("198.18.0.2:0").expect("bind");
            s.send_to(b"checksum probe", "198.18.0.1:9").expect("send");
        })?;
        std::thread::sleep(Duration::from_millis(200));
        stop.store(true, Ordering::SeqCst);
        let got = rx.join().expect("join")?;
        let udp: Vec<_> = got
            .iter()
            .filter(|(f, _)| f.len() > 34 && f[12..14] == [8, 0] && f[23] == 17)
            .collect();
        assert_eq!(
            udp.len(),
            1,
            "offload {offload}: expected one UDP frame, got {}",
            udp.len()
        );
        seen.push(udp[0].1.csum_not_ready);
    }
    assert_eq!(
        seen,
        vec![true, false],
        "csum_not_ready with tx offload on/off"
    );
    Ok(())
}
