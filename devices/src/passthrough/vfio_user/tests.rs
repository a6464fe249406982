//! The client against scripted and hostile servers.

use std::os::unix::net::{UnixListener, UnixStream};
use std::thread;

use super::*;

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
fn scripted_server() -> Vec<u8> {
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
    c.reset()
}

#[test]
fn a_whole_conversation_and_every_truncation_of_it() {
    let script = scripted_server();
    conversation(&script).unwrap();
    // The fuzz target starts from this conversation (tests/fuzz.sh asks for it).
    if let Some(dir) = std::env::var_os("VMM_FUZZ_SEED_DIR") {
        let dir = std::path::Path::new(&dir).join("vfio_user_replies");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("conversation"), &script).unwrap();
    }
    // Cut anywhere, the client fails cleanly.
    for cut in (0..script.len()).step_by(7) {
        assert!(conversation(&script[..cut]).is_err(), "cut at {cut}");
    }
}
