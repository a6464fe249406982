//! The client against scripted and hostile servers.

use std::os::unix::net::{UnixListener, UnixStream};
use std::thread;

use super::*;

mod feature;

/// A server that answers VERSION properly, then sends `bad` as the reply to the next
/// command.
fn hostile(bad: Vec<u8>) -> Result<VfioUserClient, VfioUserError> {
    let dir = std::env::temp_dir().join(format!("vu-{}-{}", std::process::id(), rand_suffix()));
    let listener = UnixListener::bind(&dir).unwrap();
    let t = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut h = [0u8; 16];
        s.read_exact(&mut h).unwrap();
        let size = u32_at(&h, 4) as usize;
        let mut rest = vec![0u8; size - 16];
        s.read_exact(&mut rest).unwrap();
        // A good VERSION reply.
        let caps = b"{}\0";
        let mut r = vec![h[0], h[1], 1, 0];
        r.extend_from_slice(&((16 + 4 + caps.len()) as u32).to_le_bytes());
        r.extend_from_slice(&1u32.to_le_bytes());
        r.extend_from_slice(&0u32.to_le_bytes());
        r.extend_from_slice(&[0, 0, 1, 0]);
        r.extend_from_slice(caps);
        s.write_all(&r).unwrap();
        // Whatever comes next gets `bad`.
        let _ = s.read(&mut [0u8; 64]);
        let _ = s.write_all(&bad);
        thread::sleep(Duration::from_millis(100));
    });
    let r = VfioUserClient::connect(&dir, Duration::from_secs(2));
    let _ = std::fs::remove_file(&dir);
    t.join().unwrap();
    r
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn header(id: u16, cmd: u16, size: u32, flags: u32, errno: u32) -> Vec<u8> {
    let mut h = id.to_le_bytes().to_vec();
    h.extend_from_slice(&cmd.to_le_bytes());
    h.extend_from_slice(&size.to_le_bytes());
    h.extend_from_slice(&flags.to_le_bytes());
    h.extend_from_slice(&errno.to_le_bytes());
    h
}

#[test]
fn malformed_replies_are_refused() {
    // Truncated: the socket closes mid-header.
    assert!(matches!(hostile(vec![1, 0, 4]), Err(VfioUserError::Io(_))));
    // A size below the header.
    let e = hostile(header(1, 4, 3, 1, 0)).err().unwrap();
    assert!(e.to_string().contains("message size 3"), "{e}");
    // A huge size.
    let e = hostile(header(1, 4, u32::MAX, 1, 0)).err().unwrap();
    assert!(e.to_string().contains("message size"), "{e}");
    // Wrong command in the reply.
    let mut r = header(1, 9, 32, 1, 0);
    r.extend_from_slice(&[0; 16]);
    let e = hostile(r).err().unwrap();
    assert!(e.to_string().contains("command 9"), "{e}");
    // A device info too short.
    let mut r = header(1, 4, 20, 1, 0);
    r.extend_from_slice(&[0; 4]);
    let e = hostile(r).err().unwrap();
    assert!(e.to_string().contains("shorter"), "{e}");
    // Too many regions.
    let mut r = header(1, 4, 32, 1, 0);
    r.extend_from_slice(&16u32.to_le_bytes());
    r.extend_from_slice(&0u32.to_le_bytes());
    r.extend_from_slice(&100_000u32.to_le_bytes());
    r.extend_from_slice(&1u32.to_le_bytes());
    let e = hostile(r).err().unwrap();
    assert!(e.to_string().contains("implausible"), "{e}");
    // An error reply.
    let e = hostile(header(1, 4, 16, 1 | FLAG_ERROR, 22)).err().unwrap();
    assert!(matches!(e, VfioUserError::Refused { errno: 22, .. }), "{e}");
}

/// One reply message.
fn reply(id: u16, cmd: u16, body: &[u8]) -> Vec<u8> {
    let mut r = header(id, cmd, (16 + body.len()) as u32, FLAG_REPLY, 0);
    r.extend_from_slice(body);
    r
}

/// Everything a well-behaved server with two 256-byte regions and one IRQ index says to
/// the calls `conversation` makes, in order.
pub(crate) fn scripted_server() -> Vec<u8> {
    let mut out = Vec::new();
    let mut version = vec![0, 0, 1, 0];
    version.extend_from_slice(b"{}\0");
    out.extend(reply(0, CMD_VERSION, &version));
    let mut info = 16u32.to_le_bytes().to_vec();
    info.extend_from_slice(&0u32.to_le_bytes());
    info.extend_from_slice(&2u32.to_le_bytes());
    info.extend_from_slice(&1u32.to_le_bytes());
    out.extend(reply(1, CMD_DEVICE_GET_INFO, &info));
    for i in 0..2u32 {
        let mut r = vec![0u8; 32];
        r[..4].copy_from_slice(&32u32.to_le_bytes());
        r[4..8].copy_from_slice(&3u32.to_le_bytes());
        r[8..12].copy_from_slice(&i.to_le_bytes());
        r[16..24].copy_from_slice(&256u64.to_le_bytes());
        out.extend(reply(2 + i as u16, CMD_DEVICE_GET_REGION_INFO, &r));
    }
    let mut id = 4u16;
    for i in 0..2u32 {
        let mut rd = 0u64.to_le_bytes().to_vec();
        rd.extend_from_slice(&i.to_le_bytes());
        rd.extend_from_slice(&64u32.to_le_bytes());
        rd.extend_from_slice(&[0xab; 64]);
        out.extend(reply(id, CMD_REGION_READ, &rd));
        let mut wr = 8u64.to_le_bytes().to_vec();
        wr.extend_from_slice(&i.to_le_bytes());
        wr.extend_from_slice(&4u32.to_le_bytes());
        out.extend(reply(id + 1, CMD_REGION_WRITE, &wr));
        id += 2;
    }
    let mut irq = 16u32.to_le_bytes().to_vec();
    irq.extend_from_slice(&0u32.to_le_bytes());
    irq.extend_from_slice(&0u32.to_le_bytes());
    irq.extend_from_slice(&1u32.to_le_bytes());
    out.extend(reply(id, CMD_GET_IRQ_INFO, &irq));
    out.extend(reply(id + 1, CMD_SET_IRQS, &[]));
    out.extend(reply(id + 2, CMD_DMA_MAP, &[]));
    out.extend(reply(id + 3, CMD_DMA_UNMAP, &[]));
    out.extend(reply(id + 4, CMD_DEVICE_RESET, &[]));
    // DEVICE_FEATURE: MIGRATION GET (STOP_COPY), MIG_DEVICE_STATE SET STOP, then a DMA_READ
    // command from the server before MIG_DATA_READ's reply (4 bytes: the end of the data),
    // then DMA_LOGGING_REPORT of 64 pages (one word: pages 0 and 63).
    let feature = |flags: u32, data: &[u8]| {
        let mut b = ((8 + data.len()) as u32).to_le_bytes().to_vec();
        b.extend_from_slice(&flags.to_le_bytes());
        b.extend_from_slice(data);
        b
    };
    out.extend(reply(
        id + 5,
        CMD_DEVICE_FEATURE,
        &feature(1 | 1 << 16, &1u64.to_le_bytes()),
    ));
    let mut st = 1u32.to_le_bytes().to_vec();
    st.extend_from_slice(&(-1i32).to_le_bytes());
    out.extend(reply(
        id + 6,
        CMD_DEVICE_FEATURE,
        &feature(2 | 1 << 17, &st),
    ));
    let mut rd = 0x10000u64.to_le_bytes().to_vec();
    rd.extend_from_slice(&8u64.to_le_bytes());
    out.extend(command(0x8000, CMD_DMA_READ, &rd));
    let mut md = 12u32.to_le_bytes().to_vec();
    md.extend_from_slice(&4u32.to_le_bytes());
    md.extend_from_slice(b"data");
    out.extend(reply(id + 7, CMD_MIG_DATA_READ, &md));
    let mut rep = 0u64.to_le_bytes().to_vec();
    rep.extend_from_slice(&(64u64 * 4096).to_le_bytes());
    rep.extend_from_slice(&4096u64.to_le_bytes());
    rep.extend_from_slice(&(1u64 | 1 << 63).to_le_bytes());
    out.extend(reply(
        id + 8,
        CMD_DEVICE_FEATURE,
        &feature(8 | 1 << 16, &rep),
    ));
    out
}

/// The calls the `vfio_user_replies` fuzz target makes, against `server` (everything the
/// server says).
fn conversation(server: &[u8]) -> Result<(), VfioUserError> {
    let (client_end, mut server_end) = UnixStream::pair().unwrap();
    server_end.write_all(server).unwrap();
    server_end.shutdown(std::net::Shutdown::Write).unwrap();
    let mut c = VfioUserClient::from_stream(client_end, Duration::from_millis(50))?;
    let memfd = std::fs::File::open("/dev/null").unwrap();
    let mut buf = [0u8; 64];
    for i in 0..c.regions().len().min(4) as u32 {
        c.region_read(i, 0, &mut buf)?;
        c.region_write(i, 8, &buf[..4])?;
    }
    c.irq_info(0)?;
    c.set_irqs(0, 0, &[])?;
    c.dma_map(0x10000, 0x2000, Some(&memfd), 0, 3)?;
    c.dma_unmap(0x10000, 0x2000)?;
    c.reset()?;
    let m = c.migration_feature()?;
    if m.is_none_or(|m| !m.stop_copy()) {
        return Err(VfioUserError::Invalid("no migration".into()));
    }
    c.set_mig_state(1)?;
    let data = c.read_mig_data()?;
    let mut bits = [0u64; 1];
    c.dma_logging_report(0, 64 * 4096, 4096, &mut bits)?;
    if data != b"data" || bits != [1 | 1 << 63] {
        return Err(VfioUserError::Invalid("wrong data or bits".into()));
    }
    Ok(())
}

#[test]
fn a_whole_conversation_and_every_truncation_of_it() {
    let script = scripted_server();
    conversation(&script).unwrap();
    // Cut anywhere, the client fails cleanly.
    for cut in (0..script.len()).step_by(7) {
        assert!(conversation(&script[..cut]).is_err(), "cut at {cut}");
    }
}

/// Reads one whole message from `s`: its header fields and body.
fn read_msg(s: &mut UnixStream) -> ((u16, u16, u32, u32), Vec<u8>) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).unwrap();
    let size = u32_at(&h, 4) as usize;
    let mut body = vec![0u8; size - 16];
    s.read_exact(&mut body).unwrap();
    let id = u16::from_le_bytes([h[0], h[1]]);
    let cmd = u16::from_le_bytes([h[2], h[3]]);
    ((id, cmd, u32_at(&h, 8), u32_at(&h, 12)), body)
}

/// The next message `(id, command, body)` from the client, or `None` once it hung up.
fn next_request(s: &mut UnixStream) -> Option<(u16, u16, Vec<u8>)> {
    let mut m = [0u8; 16];
    s.read_exact(&mut m).ok()?;
    let mut body = vec![0u8; u32_at(&m, 4) as usize - 16];
    s.read_exact(&mut body).unwrap();
    let (id, cmd) = (
        u16::from_le_bytes([m[0], m[1]]),
        u16::from_le_bytes([m[2], m[3]]),
    );
    Some((id, cmd, body))
}

/// A command from the server: `(id, command, body)`.
fn command(id: u16, cmd: u16, body: &[u8]) -> Vec<u8> {
    let mut m = header(id, cmd, (16 + body.len()) as u32, 0, 0);
    m.extend_from_slice(body);
    m
}

/// The server's side of a client's set-up: VERSION with `caps` (the JSON of
/// `"capabilities"`), then DEVICE_GET_INFO of one 8 KiB region and no IRQs, then that
/// region's info.
fn one_region_handshake(s: &mut UnixStream, caps: &str) {
    let (h, _) = read_msg(s);
    let mut v = vec![0, 0, 1, 0];
    v.extend_from_slice(format!(r#"{{"capabilities":{caps}}}"#).as_bytes());
    v.push(0);
    s.write_all(&reply(h.0, CMD_VERSION, &v)).unwrap();
    let (h, _) = read_msg(s);
    let mut info = 16u32.to_le_bytes().to_vec();
    info.extend_from_slice(&[0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
    s.write_all(&reply(h.0, CMD_DEVICE_GET_INFO, &info))
        .unwrap();
    let (h, _) = read_msg(s);
    let mut r = vec![0u8; 32];
    r[16..24].copy_from_slice(&8192u64.to_le_bytes());
    s.write_all(&reply(h.0, CMD_DEVICE_GET_REGION_INFO, &r))
        .unwrap();
}

#[test]
fn server_commands_between_a_request_and_its_reply_are_answered_never_taken_for_it() {
    use crate::passthrough::message_dma::MessageDma;
    use vm_memory::{Bytes, GuestAddress};
    let (client_end, mut s) = UnixStream::pair().unwrap();
    let server = thread::spawn(move || {
        // VERSION with small limits, one 8 KiB region, no IRQs.
        one_region_handshake(&mut s, r#"{"max_data_xfer_size":4096,"max_msg_fds":1}"#);
        // A 6 KiB REGION_READ arrives as two messages (the server's 4 KiB limit).
        let (h, body) = read_msg(&mut s);
        let mut seen = vec![u32_at(&body, 12) as usize];
        // Before the reply: a DMA_WRITE, an oversized DMA_READ, a DMA_READ of an unmapped
        // IOVA, a DMA_READ that works.
        let mut w = 0x1800u64.to_le_bytes().to_vec();
        w.extend_from_slice(&4u64.to_le_bytes());
        w.extend_from_slice(b"abcd");
        s.write_all(&command(900, CMD_DMA_WRITE, &w)).unwrap();
        let rd = |addr: u64, n: u64| {
            let mut b = addr.to_le_bytes().to_vec();
            b.extend_from_slice(&n.to_le_bytes());
            b
        };
        s.write_all(&command(901, CMD_DMA_READ, &rd(0x1000, 2 << 20)))
            .unwrap();
        s.write_all(&command(902, CMD_DMA_READ, &rd(0x9000, 16)))
            .unwrap();
        s.write_all(&command(903, CMD_DMA_READ, &rd(0x1800, 4)))
            .unwrap();
        let mut answers = Vec::new();
        for _ in 0..4 {
            let (h, body) = read_msg(&mut s);
            answers.push((h.0, h.1, h.2, h.3, body));
        }
        let answer = |s: &mut UnixStream, id: u16, body: &[u8]| {
            let count = u32_at(body, 12) as usize;
            let mut data = body[..16].to_vec();
            data.extend(std::iter::repeat_n(0x5a, count));
            s.write_all(&reply(id, CMD_REGION_READ, &data)).unwrap();
        };
        answer(&mut s, h.0, &body);
        let (h, body) = read_msg(&mut s);
        seen.push(u32_at(&body, 12) as usize);
        answer(&mut s, h.0, &body);
        (seen, answers)
    });
    let mut c = VfioUserClient::from_stream(client_end, Duration::from_secs(5)).unwrap();
    assert_eq!(c.caps().xfer(), 4096);
    let mem = Arc::new(crate::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
    let table = Arc::new(MessageDma::new(mem.clone(), None));
    table.map(0x1000, 0x4000, 0x1000, iommu::Perm::RW).unwrap();
    c.set_dma_access(table.clone());
    let mut buf = vec![0u8; 6 << 10];
    c.region_read(0, 0, &mut buf).unwrap();
    let (seen, answers) = server.join().unwrap();
    assert_eq!(
        seen,
        vec![4096, 2048],
        "split at the server's max_data_xfer_size"
    );
    assert!(buf.iter().all(|&b| b == 0x5a), "the replies, not a command");
    // Each command answered by its own id, in order.
    let ids: Vec<(u16, u16)> = answers.iter().map(|a| (a.0, a.1)).collect();
    assert_eq!(
        ids,
        vec![
            (900, CMD_DMA_WRITE),
            (901, CMD_DMA_READ),
            (902, CMD_DMA_READ),
            (903, CMD_DMA_READ)
        ]
    );
    // The write landed; the oversized read is EINVAL, the unmapped one EFAULT (with the
    // error flag and no data); the last read returns what was written.
    let mut m = [0u8; 4];
    mem.read_slice(&mut m, GuestAddress(0x4800)).unwrap();
    assert_eq!(&m, b"abcd");
    assert_eq!(answers[0].2, FLAG_REPLY);
    assert_eq!(
        (answers[1].2, answers[1].3, answers[1].4.len()),
        (FLAG_REPLY | FLAG_ERROR, libc::EINVAL as u32, 0)
    );
    assert_eq!(
        (answers[2].2, answers[2].3),
        (FLAG_REPLY | FLAG_ERROR, libc::EFAULT as u32)
    );
    assert_eq!(&answers[3].4[16..], b"abcd");
    assert_eq!(c.served(), (1, 1, 2));
    assert_eq!(table.take_faults(), vec![(0x9000, false)]);
}

#[test]
fn hostile_a_server_that_trickles_its_reply_runs_out_of_the_call_deadline() {
    let (client_end, mut s) = UnixStream::pair().unwrap();
    let server = thread::spawn(move || {
        let (h, _) = read_msg(&mut s);
        // A whole reply, one byte every 50 ms: each read gets a byte well within any
        // per-read timeout; only a deadline for the whole call stops it.
        for b in reply(h.0, CMD_VERSION, &[0, 0, 1, 0, b'{', b'}', 0]) {
            if s.write_all(&[b]).is_err() {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
    });
    let e = VfioUserClient::from_stream(client_end, Duration::from_millis(300))
        .err()
        .expect("a trickled reply must time out");
    assert!(
        matches!(&e, VfioUserError::Io(io) if io.kind() == io::ErrorKind::TimedOut),
        "{e:?}"
    );
    server.join().unwrap();
}

/// Commands are named as the vfio-user spec numbers them (QEMU's
/// `docs/interop/vfio-user.rst`, "Commands"); numbers it does not define are unknown.
#[test]
fn commands_are_named_by_their_spec_numbers() {
    let spec = [
        (1, "VERSION"),
        (2, "DMA_MAP"),
        (3, "DMA_UNMAP"),
        (4, "DEVICE_GET_INFO"),
        (5, "DEVICE_GET_REGION_INFO"),
        (6, "DEVICE_GET_REGION_IO_FDS"),
        (7, "GET_IRQ_INFO"),
        (8, "SET_IRQS"),
        (9, "REGION_READ"),
        (10, "REGION_WRITE"),
        (11, "DMA_READ"),
        (12, "DMA_WRITE"),
        (13, "DEVICE_RESET"),
        (16, "DEVICE_FEATURE"),
        (17, "MIG_DATA_READ"),
        (18, "MIG_DATA_WRITE"),
    ];
    for (cmd, n) in spec {
        assert_eq!(name(cmd), n, "command {cmd}");
    }
    for cmd in [0, 14, 15, 19, 0xffff] {
        assert_eq!(name(cmd), "unknown command");
    }
}

/// The header flags and the interrupt actions are the spec's and the kernel's bits: a reply
/// is type 1, `no_reply` is bit 4, `error` bit 5; an eventfd trigger is
/// `VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER` (0x24), disabling
/// `VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER` (0x21). A message may carry one
/// transfer and 4 KiB of headers.
#[test]
fn header_flags_and_irq_actions_are_the_specs() {
    assert_eq!((FLAG_REPLY, FLAG_NO_REPLY, FLAG_ERROR), (1, 0x10, 0x20));
    assert_eq!(
        (IRQ_SET_EVENTFD_TRIGGER, IRQ_SET_NONE_TRIGGER),
        (0x24, 0x21)
    );
    assert_eq!(MAX_MESSAGE, CLIENT_MAX_XFER as usize + 4096);
    assert!(MAX_MESSAGE > CLIENT_MAX_XFER as usize);
}

/// A server that never answers, or stops in the middle of its reply, runs out of the call's
/// deadline: both are the same timeout, named, not the socket's own error.
#[test]
fn hostile_a_silent_or_stalled_server_times_out_by_name() {
    let timed_out = |e: VfioUserError| {
        assert!(
            matches!(&e, VfioUserError::Io(io) if io.kind() == io::ErrorKind::TimedOut
                && io.to_string() == "the device process did not answer in time"),
            "{e:?}"
        );
    };
    // The server keeps its end open until the client has given up (or 10 s at most).
    for stall_after in [None, Some(20)] {
        let (client_end, mut s) = UnixStream::pair().unwrap();
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let server = thread::spawn(move || {
            let (h, _) = read_msg(&mut s);
            if let Some(n) = stall_after {
                let r = reply(h.0, CMD_VERSION, &[0, 0, 1, 0, b'{', b'}', 0]);
                s.write_all(&r[..n]).unwrap();
            }
            let _ = wait.recv_timeout(Duration::from_secs(10));
        });
        timed_out(
            VfioUserClient::from_stream(client_end, Duration::from_millis(200))
                .err()
                .unwrap(),
        );
        done.send(()).unwrap();
        server.join().unwrap();
    }
}

/// A client connected to a server that answers VERSION and DEVICE_GET_INFO (no regions, no
/// IRQs) over `s`.
fn bare_client(mut s: UnixStream, client_end: UnixStream) -> (VfioUserClient, UnixStream) {
    let server = thread::spawn(move || {
        let (h, _) = read_msg(&mut s);
        s.write_all(&reply(h.0, CMD_VERSION, &[0, 0, 1, 0, b'{', b'}', 0]))
            .unwrap();
        let (h, _) = read_msg(&mut s);
        let mut info = 16u32.to_le_bytes().to_vec();
        info.extend_from_slice(&[0; 12]);
        s.write_all(&reply(h.0, CMD_DEVICE_GET_INFO, &info))
            .unwrap();
        s
    });
    let c = VfioUserClient::from_stream(client_end, Duration::from_secs(5)).unwrap();
    (c, server.join().unwrap())
}

/// Commands a server sends between requests are served in batches of at most 64 (a
/// flooding server cannot hold the event loop), each answered by its id; nothing waiting is
/// a batch of 0. A reply to nothing asked, or a server gone, ends the device.
#[test]
fn server_commands_between_requests_are_served_in_bounded_batches() {
    use crate::passthrough::message_dma::MessageDma;
    use vm_memory::{Bytes, GuestAddress};
    let (client_end, s) = UnixStream::pair().unwrap();
    let (mut c, mut s) = bare_client(s, client_end);
    let mem = Arc::new(crate::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
    let table = Arc::new(MessageDma::new(mem.clone(), None));
    table.map(0x1000, 0x4000, 0x1000, iommu::Perm::RW).unwrap();
    c.set_dma_access(table.clone());
    assert_eq!(c.serve_server_commands().unwrap(), 0);
    for i in 0..70u16 {
        let mut w = 0x1800u64.to_le_bytes().to_vec();
        w.extend_from_slice(&1u64.to_le_bytes());
        w.push(i as u8);
        s.write_all(&command(1000 + i, CMD_DMA_WRITE, &w)).unwrap();
    }
    assert_eq!(c.serve_server_commands().unwrap(), 64);
    assert_eq!(c.serve_server_commands().unwrap(), 6);
    assert_eq!(c.serve_server_commands().unwrap(), 0);
    let ids: Vec<u16> = (0..70).map(|_| read_msg(&mut s).0 .0).collect();
    assert_eq!(ids, (1000..1070).collect::<Vec<u16>>());
    let mut last = [0u8; 1];
    mem.read_slice(&mut last, GuestAddress(0x4800)).unwrap();
    assert_eq!(last, [69]);
    assert_eq!(c.served(), (0, 70, 0));

    // A read of exactly the largest transfer (1 MiB) is served; the server gets it whole.
    table.map(0x10_0000, 0, 1 << 20, iommu::Perm::RW).unwrap();
    let mut rd = 0x10_0000u64.to_le_bytes().to_vec();
    rd.extend_from_slice(&(1u64 << 20).to_le_bytes());
    s.write_all(&command(2000, CMD_DMA_READ, &rd)).unwrap();
    // The reply is larger than the socket's buffer: read it while it is written.
    let mut r = s.try_clone().unwrap();
    let reader = thread::spawn(move || read_msg(&mut r));
    assert_eq!(c.serve_server_commands().unwrap(), 1);
    let (h, body) = reader.join().unwrap();
    assert_eq!((h.0, h.3, body.len()), (2000, 0, 16 + (1 << 20)));

    s.write_all(&reply(7, CMD_DMA_READ, &[])).unwrap();
    let e = c.serve_server_commands().unwrap_err().to_string();
    assert!(e.contains("a reply to nothing asked"), "{e}");
    drop(s);
    let e = c.serve_server_commands().unwrap_err();
    assert!(
        matches!(&e, VfioUserError::Io(io) if io.kind() == io::ErrorKind::UnexpectedEof),
        "{e:?}"
    );
}

/// What the region server saw: `(command, offset, count)` per message.
type Seen = thread::JoinHandle<Vec<(u16, u64, u32)>>;

/// A device of one 8 KiB region and a 4 KiB transfer limit, whose server answers region
/// reads (with `0x5a`) and writes, and records `(command, offset, count)` of each; it
/// miscounts its answer to a read at 0x100 and to a write at 0x200.
fn region_device() -> (VfioUserClient, Seen) {
    let (client_end, mut s) = UnixStream::pair().unwrap();
    let server = thread::spawn(move || {
        one_region_handshake(&mut s, r#"{"max_data_xfer_size":4096}"#);
        let mut seen = Vec::new();
        let mut m = [0u8; 16];
        while s.read_exact(&mut m).is_ok() {
            let size = u32_at(&m, 4) as usize;
            let mut body = vec![0u8; size - 16];
            s.read_exact(&mut body).unwrap();
            let (id, cmd) = (
                u16::from_le_bytes([m[0], m[1]]),
                u16::from_le_bytes([m[2], m[3]]),
            );
            let offset = u64::from_le_bytes(body[..8].try_into().unwrap());
            let count = u32_at(&body, 12);
            seen.push((cmd, offset, count));
            let mut out = body[..16].to_vec();
            if cmd == CMD_REGION_READ {
                let told = if offset == 0x100 { count + 1 } else { count };
                out[12..16].copy_from_slice(&told.to_le_bytes());
                out.extend(std::iter::repeat_n(0x5a, count as usize));
            } else if offset == 0x200 {
                out[12..16].copy_from_slice(&(count - 1).to_le_bytes());
            } else if offset == 0x300 {
                // Shorter than a write's reply.
                out.truncate(8);
            }
            s.write_all(&reply(id, cmd, &out)).unwrap();
        }
        seen
    });
    let c = VfioUserClient::from_stream(client_end, Duration::from_secs(5)).unwrap();
    (c, server)
}

/// Region accesses are split at the server's transfer limit, each piece at its own offset;
/// an access must lie inside the region (its last byte may be the region's last); a reply
/// that does not carry, or confirm, what was asked is refused.
#[test]
fn region_accesses_split_stay_inside_and_check_their_replies() {
    let (mut c, server) = region_device();
    let mut buf = vec![0u8; 8192];
    c.region_read(0, 0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a));
    c.region_read(0, 4096, &mut buf[..4096]).unwrap();
    c.region_write(0, 0, &[1u8; 6144]).unwrap();
    for (offset, len) in [(4097u64, 4096usize), (8192, 1), (u64::MAX, 2)] {
        let e = c.region_read(0, offset, &mut buf[..len]).unwrap_err();
        assert!(matches!(e, VfioUserError::Invalid(_)), "{e:?}");
        let e = c.region_write(0, offset, &buf[..len]).unwrap_err();
        assert!(matches!(e, VfioUserError::Invalid(_)), "{e:?}");
    }
    assert!(matches!(
        c.region_read(1, 0, &mut buf[..4]),
        Err(VfioUserError::Invalid(_))
    ));
    let e = c
        .region_read(0, 0x100, &mut buf[..8])
        .unwrap_err()
        .to_string();
    assert!(e.contains("REGION_READ"), "{e}");
    let e = c.region_write(0, 0x200, &buf[..8]).unwrap_err().to_string();
    assert!(e.contains("reply does not confirm the write"), "{e}");
    let e = c.region_write(0, 0x300, &buf[..8]).unwrap_err().to_string();
    assert!(e.contains("reply does not confirm the write"), "{e}");
    drop(c);
    assert_eq!(
        server.join().unwrap(),
        vec![
            (CMD_REGION_READ, 0, 4096),
            (CMD_REGION_READ, 4096, 4096),
            (CMD_REGION_READ, 4096, 4096),
            (CMD_REGION_WRITE, 0, 4096),
            (CMD_REGION_WRITE, 4096, 2048),
            (CMD_REGION_READ, 0x100, 8),
            (CMD_REGION_WRITE, 0x200, 8),
            (CMD_REGION_WRITE, 0x300, 8),
        ]
    );
}

/// `region_io_fds(0)` of a client whose server has one 8 KiB region and answers
/// GET_REGION_IO_FDS with `message(id)` and `fds` eventfds attached.
fn io_fds_with(
    message: impl FnOnce(u16) -> Vec<u8> + Send + 'static,
    fds: usize,
) -> Result<Vec<IoFd>, VfioUserError> {
    let (client_end, mut s) = UnixStream::pair().unwrap();
    let server = thread::spawn(move || {
        one_region_handshake(&mut s, "{}");
        let (h, req) = read_msg(&mut s);
        // argsz: the header and room for 64 sub-regions of 40 bytes; region 0.
        assert_eq!((u32_at(&req, 0), u32_at(&req, 8)), (16 + 40 * 64, 0));
        let evts: Vec<vmm_sys_util::eventfd::EventFd> = (0..fds)
            .map(|_| vmm_sys_util::eventfd::EventFd::new(0).unwrap())
            .collect();
        let raw: Vec<RawFd> = evts.iter().map(|e| e.as_raw_fd()).collect();
        s.send_with_fds(&[&message(h.0)[..]], &raw).unwrap();
        s
    });
    let mut c = VfioUserClient::from_stream(client_end, Duration::from_secs(5)).unwrap();
    let r = c.region_io_fds(0);
    server
        .join()
        .expect("the request as the specification lays it out");
    r
}

/// A GET_REGION_IO_FDS reply for region `index` announcing `count` sub-regions, carrying
/// `entries` (`(offset, size, fd index, type, flags, datamatch)`, 40 bytes each).
fn io_fds_reply(index: u32, count: u32, entries: &[(u64, u64, u32, u32, u32, u64)]) -> Vec<u8> {
    let mut b = (16 + 40 * entries.len() as u32).to_le_bytes().to_vec();
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&index.to_le_bytes());
    b.extend_from_slice(&count.to_le_bytes());
    for &(off, size, fd, kind, flags, datamatch) in entries {
        b.extend_from_slice(&off.to_le_bytes());
        b.extend_from_slice(&size.to_le_bytes());
        for v in [fd, kind, flags, 0] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&datamatch.to_le_bytes());
    }
    b
}

/// vfio-user.rst, "VFIO_USER_DEVICE_GET_REGION_IO_FDS": each ioeventfd sub-region comes
/// with its descriptor (by index) and, when its flag says so, the value it matches; other
/// types are skipped. A server that refuses the command offers none; a reply for another
/// region, announcing more than 64 sub-regions or more than it carries, naming a range
/// outside the region or a descriptor it did not send, is refused.
#[test]
fn region_io_fds_are_read_by_the_spec_and_bad_ones_refused() {
    let ok = io_fds_with(
        |id| {
            let e = [
                (0x28, 4, 1, 0, 1, 0x77),
                (0x100, 8, 0, 1, 0, 0),
                (0x1ffc, 4, 0, 0, 0, 0x99),
            ];
            reply(id, CMD_DEVICE_GET_REGION_IO_FDS, &io_fds_reply(0, 3, &e))
        },
        2,
    )
    .unwrap();
    let got: Vec<(u64, u64, Option<u64>)> = ok.iter().map(|f| (f.0, f.1, f.2)).collect();
    assert_eq!(got, [(0x28, 4, Some(0x77)), (0x1ffc, 4, None)]);
    assert!(!Arc::ptr_eq(&ok[0].3, &ok[1].3), "each its own descriptor");
    // 64 sub-regions, the most a reply may carry.
    let many = io_fds_with(
        |id| {
            let e: Vec<_> = (0..64).map(|i| (i * 8, 4, 0, 0, 0, 0)).collect();
            reply(id, CMD_DEVICE_GET_REGION_IO_FDS, &io_fds_reply(0, 64, &e))
        },
        1,
    );
    assert_eq!(many.unwrap().len(), 64);
    let refused = io_fds_with(
        |id| {
            header(
                id,
                CMD_DEVICE_GET_REGION_IO_FDS,
                16,
                FLAG_REPLY | FLAG_ERROR,
                22,
            )
        },
        0,
    );
    assert!(refused.unwrap().is_empty());
    let entry = |off, size, fd| [(off, size, fd, 0, 0, 0)];
    for (what, body, fds) in [
        ("another region", io_fds_reply(1, 1, &entry(0, 4, 0)), 1),
        ("short header", vec![0u8; 12], 1),
        ("65 sub-regions", io_fds_reply(0, 65, &entry(0, 4, 0)), 1),
        ("more than carried", io_fds_reply(0, 2, &entry(0, 4, 0)), 1),
        ("past the end", io_fds_reply(0, 1, &entry(0x1ffd, 4, 0)), 1),
        (
            "empty at the end",
            io_fds_reply(0, 1, &entry(0x2000, 0, 0)),
            1,
        ),
        ("no such descriptor", io_fds_reply(0, 1, &entry(0, 4, 1)), 1),
    ] {
        let r = io_fds_with(
            move |id| reply(id, CMD_DEVICE_GET_REGION_IO_FDS, &body),
            fds,
        );
        assert!(
            matches!(r, Err(VfioUserError::Protocol { .. })),
            "{what}: {:?}",
            r.map(|v| v.len())
        );
    }
}

/// A client whose server has one region and answers its GET_REGION_INFO requests with
/// `replies` in turn (a body, and eventfds attached: the region's file); returns the client
/// and the `argsz` of each request.
fn region_info_with(replies: Vec<(Vec<u8>, usize)>) -> (VfioUserClient, Vec<u32>) {
    let (client_end, mut s) = UnixStream::pair().unwrap();
    let server = thread::spawn(move || {
        // A request that never comes fails the test instead of hanging it.
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let (h, _) = read_msg(&mut s);
        s.write_all(&reply(h.0, CMD_VERSION, &[0, 0, 1, 0, b'{', b'}', 0]))
            .unwrap();
        let (h, _) = read_msg(&mut s);
        let mut info = 16u32.to_le_bytes().to_vec();
        info.extend_from_slice(&[0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
        s.write_all(&reply(h.0, CMD_DEVICE_GET_INFO, &info))
            .unwrap();
        let mut asked = Vec::new();
        for (body, fds) in replies {
            let (h, req) = read_msg(&mut s);
            asked.push(u32_at(&req, 0));
            let files: Vec<vmm_sys_util::eventfd::EventFd> = (0..fds)
                .map(|_| vmm_sys_util::eventfd::EventFd::new(0).unwrap())
                .collect();
            let raw: Vec<RawFd> = files.iter().map(|e| e.as_raw_fd()).collect();
            let msg = reply(h.0, CMD_DEVICE_GET_REGION_INFO, &body);
            s.send_with_fds(&[&msg[..]], &raw).unwrap();
        }
        asked
    });
    let c = VfioUserClient::from_stream(client_end, Duration::from_secs(5)).unwrap();
    (c, server.join().unwrap())
}

/// A `struct vfio_region_info` of 16 KiB at file offset 0x5000 with `flags` and `argsz`,
/// followed by a sparse-mmap capability of `areas` when `caps` (cap_offset 32).
fn region_info_body(argsz: u32, flags: u32, caps: bool, areas: &[(u64, u64)]) -> Vec<u8> {
    let mut b = argsz.to_le_bytes().to_vec();
    b.extend_from_slice(&flags.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&(if caps { 32u32 } else { 0 }).to_le_bytes());
    b.extend_from_slice(&0x4000u64.to_le_bytes());
    b.extend_from_slice(&0x5000u64.to_le_bytes());
    if caps {
        b.extend_from_slice(&1u16.to_le_bytes());
        b.extend_from_slice(&1u16.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&(areas.len() as u32).to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        for &(o, s) in areas {
            b.extend_from_slice(&o.to_le_bytes());
            b.extend_from_slice(&s.to_le_bytes());
        }
    }
    b
}

/// vfio-user.rst, "VFIO_USER_DEVICE_GET_REGION_INFO": a reply whose `argsz` is larger than
/// asked (it has capabilities) is asked again with room for them; the region is mappable
/// where its sparse-mmap areas say, from the file the reply carried, only with the MMAP flag,
/// a file and at least one area.
#[test]
fn region_info_is_asked_again_for_its_capabilities_and_mapped_by_its_areas() {
    const RW: u32 = 0x1 | 0x2;
    const MMAP: u32 = 0x4;
    const CAPS: u32 = 0x8;
    let area = [(0x1000, 0x1000)];
    let full = region_info_body(64, RW | MMAP | CAPS, true, &area);
    let (c, asked) = region_info_with(vec![(full[..32].to_vec(), 0), (full.clone(), 1)]);
    assert_eq!(asked, [32, 64]);
    assert_eq!(c.regions()[0].size, 0x4000);
    let m = c.region_mmap(0).expect("mappable");
    assert_eq!((m.file_offset, m.areas.clone()), (0x5000, area.to_vec()));
    // No CAPS flag: nothing asked again, and without the capability nothing mapped.
    let (c, asked) = region_info_with(vec![(region_info_body(64, RW | MMAP, false, &[]), 1)]);
    assert_eq!(asked, [32]);
    assert!(c.region_mmap(0).is_none());
    // CAPS, but all of it fits in what was asked: not asked again.
    let (c, asked) = region_info_with(vec![(region_info_body(32, RW | CAPS, false, &[]), 0)]);
    assert_eq!(asked, [32]);
    assert!(c.region_mmap(0).is_none());
    // Areas and a file, but no MMAP flag; the MMAP flag, but no area; no file.
    for (flags, areas, fds) in [
        (RW | CAPS, &area[..], 1),
        (RW | MMAP | CAPS, &[][..], 1),
        (RW | MMAP | CAPS, &area[..], 0),
    ] {
        let body = region_info_body(32 + 16 + 16 * areas.len() as u32, flags, true, areas);
        let (c, _) = region_info_with(vec![(body.clone(), fds), (body, fds)]);
        assert!(c.region_mmap(0).is_none(), "{flags:#x} {areas:?} {fds}");
    }
}

/// vfio-user.rst, "VFIO_USER_DEVICE_SET_IRQS" and "VFIO_USER_DEVICE_GET_IRQ_INFO": vectors
/// are set in messages of at most the server's `max_msg_fds` descriptors, each from its own
/// start; no descriptors disables the index. IRQ info is asked only of an index the device
/// has, and a reply for another index is refused.
#[test]
fn irqs_are_set_in_messages_the_server_takes_and_asked_of_indices_it_has() {
    let (client_end, mut s) = UnixStream::pair().unwrap();
    let server = thread::spawn(move || {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let (h, _) = read_msg(&mut s);
        let mut v = vec![0, 0, 1, 0];
        v.extend_from_slice(br#"{"capabilities":{"max_msg_fds":2}}"#);
        v.push(0);
        s.write_all(&reply(h.0, CMD_VERSION, &v)).unwrap();
        let (h, _) = read_msg(&mut s);
        // No regions, one IRQ index.
        let mut info = 16u32.to_le_bytes().to_vec();
        info.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]);
        s.write_all(&reply(h.0, CMD_DEVICE_GET_INFO, &info))
            .unwrap();
        // SET_IRQS messages: (flags, index, start, count, descriptors received).
        let mut sets = Vec::new();
        loop {
            let mut h = [0u8; 16];
            let mut fds = [-1 as RawFd; 8];
            let mut iov = [libc::iovec {
                iov_base: h.as_mut_ptr().cast(),
                iov_len: 16,
            }];
            // SAFETY: `iov` points at `h`, which outlives the call.
            let Ok((16, nfds)) = (unsafe { s.recv_with_fds(&mut iov, &mut fds) }) else {
                break;
            };
            for &fd in &fds[..nfds] {
                // SAFETY: descriptors just received, ours to close.
                drop(unsafe { std::fs::File::from_raw_fd(fd) });
            }
            let mut body = vec![0u8; u32_at(&h, 4) as usize - 16];
            s.read_exact(&mut body).unwrap();
            let (id, cmd) = (
                u16::from_le_bytes([h[0], h[1]]),
                u16::from_le_bytes([h[2], h[3]]),
            );
            if cmd == CMD_SET_IRQS {
                let f = |o| u32_at(&body, o);
                sets.push((f(4), f(8), f(12), f(16), nfds));
                s.write_all(&reply(id, cmd, &[])).unwrap();
            } else if cmd == CMD_GET_IRQ_INFO {
                // The first ask gets its own index with 3 vectors, the second another index,
                // the third a reply cut short.
                let index = if sets.len() == 4 { u32_at(&body, 8) } else { 7 };
                let mut r = 16u32.to_le_bytes().to_vec();
                r.extend_from_slice(&0x9u32.to_le_bytes());
                r.extend_from_slice(&index.to_le_bytes());
                r.extend_from_slice(&3u32.to_le_bytes());
                if sets.len() == 6 {
                    r[8..12].copy_from_slice(&u32_at(&body, 8).to_le_bytes());
                    r.truncate(12);
                }
                sets.push((0, 0, 0, 0, 0));
                s.write_all(&reply(id, cmd, &r)).unwrap();
            }
        }
        sets
    });
    let mut c = VfioUserClient::from_stream(client_end, Duration::from_secs(5)).unwrap();
    assert_eq!(c.num_irqs(), 1);
    let evts: Vec<vmm_sys_util::eventfd::EventFd> = (0..5)
        .map(|_| vmm_sys_util::eventfd::EventFd::new(0).unwrap())
        .collect();
    let raw: Vec<RawFd> = evts.iter().map(|e| e.as_raw_fd()).collect();
    c.set_irqs(0, 10, &raw).unwrap();
    c.set_irqs(0, 0, &[]).unwrap();
    let info = c.irq_info(0).unwrap();
    assert_eq!((info.flags, info.count), (0x9, 3));
    assert!(matches!(c.irq_info(0), Err(VfioUserError::Protocol { .. })));
    assert!(matches!(c.irq_info(0), Err(VfioUserError::Protocol { .. })));
    assert!(matches!(c.irq_info(1), Err(VfioUserError::Invalid(_))));
    drop(c);
    let (eventfd, none) = (IRQ_SET_EVENTFD_TRIGGER, IRQ_SET_NONE_TRIGGER);
    assert_eq!(
        server.join().unwrap(),
        [
            (eventfd, 0, 10, 2, 2),
            (eventfd, 0, 12, 2, 2),
            (eventfd, 0, 14, 1, 1),
            (none, 0, 0, 0, 0),
            (0, 0, 0, 0, 0),
            (0, 0, 0, 0, 0),
            (0, 0, 0, 0, 0),
        ]
    );
}

/// A client set up by a server that answers VERSION with `version` and DEVICE_GET_INFO with
/// `regions` regions and `irqs` IRQ indexes, then each region's info (256 bytes, no caps).
fn set_up_by(version: Vec<u8>, regions: u32, irqs: u32) -> Result<VfioUserClient, VfioUserError> {
    let (client_end, mut s) = UnixStream::pair().unwrap();
    let server = thread::spawn(move || {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let (h, _) = read_msg(&mut s);
        s.write_all(&reply(h.0, CMD_VERSION, &version)).unwrap();
        let (h, _) = read_msg(&mut s);
        let mut info = 16u32.to_le_bytes().to_vec();
        info.extend_from_slice(&0u32.to_le_bytes());
        info.extend_from_slice(&regions.to_le_bytes());
        info.extend_from_slice(&irqs.to_le_bytes());
        s.write_all(&reply(h.0, CMD_DEVICE_GET_INFO, &info))
            .unwrap();
        // Region infos for as long as the client asks.
        while let Some((id, _, body)) = next_request(&mut s) {
            let mut r = vec![0u8; 32];
            r[..4].copy_from_slice(&32u32.to_le_bytes());
            r[8..12].copy_from_slice(&body[8..12]);
            r[16..24].copy_from_slice(&256u64.to_le_bytes());
            s.write_all(&reply(id, CMD_DEVICE_GET_REGION_INFO, &r))
                .unwrap();
        }
    });
    // The server thread ends once the client hangs up.
    drop(server);
    VfioUserClient::from_stream(client_end, Duration::from_secs(5))
}

/// vfio-user.rst, "VFIO_USER_VERSION" and "VFIO_USER_DEVICE_GET_INFO": a version reply of
/// just major and minor (no capabilities) takes the defaults; up to 64 regions and 64 IRQ
/// indexes are plausible, 65 are not.
#[test]
fn a_bare_version_and_the_bounds_of_a_device() {
    let c = set_up_by(vec![0, 0, 1, 0], 1, 1).unwrap();
    assert_eq!(*c.caps(), ServerCaps::default());
    let c = set_up_by(vec![0, 0, 1, 0, b'{', b'}', 0], 64, 64).unwrap();
    assert_eq!((c.regions().len(), c.num_irqs()), (64, 64));
    for (regions, irqs) in [(65, 1), (1, 65)] {
        let e = set_up_by(vec![0, 0, 1, 0], regions, irqs).err().unwrap();
        assert!(
            e.to_string().contains("implausible"),
            "{regions} {irqs}: {e}"
        );
    }
    let e = set_up_by(vec![0, 0, 1], 1, 1).err().unwrap();
    assert!(e.to_string().contains("shorter than a version"), "{e}");
}

/// A server that hangs up with a request unread resets the connection: the error says so
/// (it is not a timeout, nor an orderly end).
#[test]
fn a_server_that_resets_the_connection_is_named_as_such() {
    // The server reads part of the request and closes, having sent nothing, or half a
    // reply's header.
    for sent in [&[][..], &[0u8; 8][..]] {
        let (client_end, s) = UnixStream::pair().unwrap();
        let (mut c, mut s) = bare_client(s, client_end);
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let reader = thread::spawn(move || {
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).unwrap();
            s.write_all(sent).unwrap();
            drop(s);
        });
        let e = c.reset().unwrap_err();
        reader.join().unwrap();
        assert!(
            matches!(&e, VfioUserError::Io(io) if io.kind() == io::ErrorKind::ConnectionReset),
            "{} bytes sent: {e:?}",
            sent.len()
        );
    }
}
