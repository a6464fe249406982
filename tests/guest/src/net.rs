//! A polled virtio-net driver (receive queue 0, transmit queue 1, the 12-byte
//! `virtio_net_hdr_v1`), for the vhost-user net device with DPDK testpmd looping frames back.
//! Behind the vIOMMU every ring and buffer address it gives the device is an IOVA: GPA + `NET_IOVA`
//! inside the region the test maps.

use crate::io::{rd16, rd8};
use crate::mem::alloc_pages;
use crate::pci::Func;
use crate::virtio::{Queue, VirtioPci, F_VERSION_1};

/// `VIRTIO_NET_F_MAC`.
const F_MAC: u64 = 1 << 5;
/// `VIRTIO_F_ACCESS_PLATFORM`.
pub const F_ACCESS_PLATFORM: u64 = 1 << 33;
/// `virtio_net_hdr_v1` bytes.
pub const HDR: u64 = 12;
/// Receive buffers kept posted.
pub const RX_BUFS: u64 = 8;
/// Bytes of each receive buffer (header and the largest frame).
pub const RX_BUF: u64 = 2048;

/// The driver.
pub struct Net {
    pci: VirtioPci,
    /// Receive queue.
    pub rx: Queue,
    /// Transmit queue.
    pub tx: Queue,
    /// The device's MAC (configuration space).
    pub mac: [u8; 6],
    /// Where the rings live (GPA) and how many pages they take.
    pub rings: (u64, u64),
    /// Added to a GPA to make the address the device is given.
    pub offset: u64,
}

impl Net {
    /// Initialises the device at `f` up to (not including) DRIVER_OK; behind the vIOMMU
    /// (`offset` != 0) it must see its rings at GPA + `offset`, which the caller maps before
    /// [`Net::start`].
    pub fn new(f: &Func, offset: u64) -> Option<Net> {
        let pci = VirtioPci::new(f)?;
        let mut want = F_VERSION_1 | F_MAC;
        if offset != 0 {
            want |= F_ACCESS_PLATFORM;
        }
        let got = pci.negotiate(want)?;
        if got & F_VERSION_1 == 0 || (offset != 0 && got & F_ACCESS_PLATFORM == 0) {
            return None;
        }
        let mut mac = [0u8; 6];
        for (i, b) in mac.iter_mut().enumerate() {
            *b = rd8(pci.device_cfg + i as u64);
        }
        let rings = crate::mem::next_page();
        let rx = pci.queue_at(0, offset);
        let tx = pci.queue_at(1, offset);
        let end = crate::mem::next_page();
        Some(Net {
            pci,
            rx,
            tx,
            mac,
            rings: (rings, (end - rings) / 4096),
            offset,
        })
    }

    /// DRIVER_OK; false when the device refused.
    pub fn start(&self) -> bool {
        self.pci.driver_ok()
    }

    /// `VIRTIO_NET_S_LINK_UP` of the configuration space.
    pub fn link_up(&self) -> bool {
        rd16(self.pci.device_cfg + 6) & 1 == 1
    }

    /// Posts the receive buffer at GPA `gpa` (device address `gpa + offset`, or `addr` when
    /// given).
    pub fn post_rx(&mut self, gpa: u64, addr: Option<u64>) {
        let a = addr.unwrap_or(gpa + self.offset);
        self.rx.add(&[(a, RX_BUF as u32, true)]);
        self.rx.kick();
    }

    /// Sends the `len`-byte frame at GPA `frame` behind a zeroed header at GPA `hdr` (two
    /// descriptors); `addr` overrides the frame's device address.
    pub fn send(&mut self, hdr: u64, frame: u64, len: u32, addr: Option<u64>) {
        crate::mem::fill(hdr, HDR, 0);
        let a = addr.unwrap_or(frame + self.offset);
        self.tx
            .add(&[(hdr + self.offset, HDR as u32, false), (a, len, false)]);
        self.tx.kick();
    }
}

/// Allocates the buffers a test needs: `(tx header, tx frame, rx buffers)`.
pub fn buffers() -> (u64, u64, u64) {
    let hdr = alloc_pages(1);
    let frame = alloc_pages(1);
    let rx = alloc_pages(RX_BUFS * RX_BUF / 4096);
    (hdr, frame, rx)
}

/// The net device as the test cases find it.
pub struct NetCtx {
    func: Func,
    /// Its endpoint ID.
    pub ep: u32,
    /// Listed behind the vIOMMU in the VIOT.
    pub behind: bool,
    dev: Option<Net>,
    bufs: (u64, u64, u64),
    /// Frames sent so far (sequence numbers).
    seq: u32,
    /// The receive buffer is posted (after a drop it stays posted for the next frame).
    rx_posted: bool,
}

/// Where the device's addresses start behind the vIOMMU (IOVA = GPA + this).
pub const NET_IOVA: u64 = 0x40_0000_0000;
/// The domain the tests attach the net device to.
const NET_DOM: u32 = 20;
const PEER: [u8; 6] = [2, 0, 0, 0, 0, 1];
const SIZES: [u32; 8] = [60, 61, 128, 255, 512, 1000, 1513, 1514];

impl NetCtx {
    /// The device at `func`.
    pub fn new(func: Func, ep: u32, behind: bool) -> NetCtx {
        NetCtx {
            func,
            ep,
            behind,
            dev: None,
            bufs: (0, 0, 0),
            seq: 0,
            rx_posted: false,
        }
    }
}

use crate::io::rdtsc;
use crate::mem::{all_eq, bytes, fill};
use crate::say;
use crate::viommu::{Req, Viommu, MAP_R, MAP_W};

const OK: u8 = 0;

fn check(cond: bool, why: &'static str) -> Result<(), &'static str> {
    if cond {
        Ok(())
    } else {
        Err(why)
    }
}

/// Brings the device up once: behind the vIOMMU, attached to its own domain with its rings
/// and buffers mapped (transmit read-only, receive write-only, as Linux maps them).
fn up<'a>(n: &'a mut NetCtx, v: Option<&mut Viommu>) -> Result<&'a mut Net, &'static str> {
    if n.dev.is_none() {
        let iommu = n.behind && v.is_some();
        let offset = if iommu { NET_IOVA } else { 0 };
        let dev = Net::new(&n.func, offset).ok_or("virtio-net negotiation failed")?;
        n.bufs = buffers();
        if let (true, Some(v)) = (iommu, v) {
            let (hdr, frame, rx) = n.bufs;
            let (rings, pages) = dev.rings;
            let map = |a: u64, len: u64, flags: u32| {
                Req::Map(NET_DOM, a + NET_IOVA, a + NET_IOVA + len - 1, a, flags)
            };
            check(v.one(Req::Attach(NET_DOM, n.ep, 0)) == OK, "ATTACH failed")?;
            let st = v.batch(&[
                map(rings, pages * 4096, MAP_R | MAP_W),
                map(hdr, 4096, MAP_R),
                map(frame, 4096, MAP_R),
                map(rx, RX_BUFS * RX_BUF, MAP_W),
            ]);
            check(st[..4] == [OK; 4], "MAP of rings or buffers failed")?;
        }
        check(dev.start(), "the device refused DRIVER_OK")?;
        check(dev.link_up(), "link down")?;
        n.dev = Some(dev);
    }
    n.dev.as_mut().ok_or("no device")
}

/// Writes frame `seq` of `size` bytes at GPA `at`: to the peer, from `mac`, ethertype 0x88b5,
/// the sequence number, then a pattern that depends on it.
fn build(at: u64, mac: &[u8; 6], seq: u32, size: u32) {
    let b = bytes(at, u64::from(size));
    b[..6].copy_from_slice(&PEER);
    b[6..12].copy_from_slice(mac);
    b[12] = 0x88;
    b[13] = 0xb5;
    b[14..18].copy_from_slice(&seq.to_le_bytes());
    for (i, x) in b[18..].iter_mut().enumerate() {
        // SAFETY: a plain byte store; volatile keeps the loop scalar (no SSE).
        unsafe { core::ptr::write_volatile(x, (i as u32).wrapping_mul(7).wrapping_add(seq) as u8) };
    }
}

/// Whether the frame received at GPA `rx` (after the header) is frame `seq` of `size` bytes
/// from `mac` with its MAC addresses swapped.
fn looped_back(rx: u64, frame: u64, mac: &[u8; 6], size: u32) -> bool {
    let got = bytes(rx + HDR, u64::from(size));
    let sent = bytes(frame, u64::from(size));
    got[..6] == *mac && got[6..12] == PEER && got[12..] == sent[12..]
}

/// Waits for a received frame (its length with the header), giving up after 300 ms (the
/// guest runs in KVM's instruction emulator on PVM hosts: a spin count would be minutes
/// there); then takes back the used transmit buffers.
fn wait_back(dev: &mut Net) -> Option<u32> {
    let deadline = crate::io::Deadline::in_ms(300);
    let back = loop {
        if let Some((_, len)) = dev.rx.pop_used() {
            break Some(len);
        }
        if deadline.passed() {
            break None;
        }
        core::hint::spin_loop();
    };
    while dev.tx.pop_used().is_some() {}
    back
}

/// Sends one frame and waits for it to come back; `Ok(false)` when it did not (a drop).
fn echo_one(n: &mut NetCtx, v: Option<&mut Viommu>, size: u32) -> Result<bool, &'static str> {
    up(n, v)?;
    let (hdr, frame, rx) = n.bufs;
    let seq = n.seq;
    n.seq += 1;
    let dev = n.dev.as_mut().ok_or("no device")?;
    build(frame, &dev.mac, seq, size);
    fill(rx, u64::from(size) + HDR, 0);
    if !n.rx_posted {
        dev.post_rx(rx, None);
        n.rx_posted = true;
    }
    dev.send(hdr, frame, size, None);
    let Some(len) = wait_back(dev) else {
        return Ok(false);
    };
    n.rx_posted = false;
    check(len == size + HDR as u32, "wrong received length")?;
    check(
        looped_back(rx, frame, &dev.mac, size),
        "received bytes differ",
    )?;
    Ok(true)
}

/// Frames of 60 to 1514 bytes looped back by the back end, every byte checked; prints the
/// device-level rate (the guest's own cost is a few hundred instructions per frame) and the
/// frames that did not come back within 300 ms (`(N dropped)`).
pub fn echo(
    n: &mut NetCtx,
    mut v: Option<&mut Viommu>,
    frames: u32,
    khz: u64,
) -> Result<(), &'static str> {
    up(n, v.as_deref_mut())?;
    let mut drops = 0u32;
    let mut bytes_back = 0u64;
    let t0 = rdtsc();
    for i in 0..frames {
        let size = SIZES[i as usize % SIZES.len()];
        if echo_one(n, v.as_deref_mut(), size)? {
            bytes_back += u64::from(size);
        } else {
            drops += 1;
        }
    }
    let cycles = rdtsc() - t0;
    let per_sec = |x: u64| {
        if cycles > 0 && khz > 0 {
            x * khz * 1000 / cycles
        } else {
            0
        }
    };
    say!(
        "# net_echo: ",
        frames - drops,
        " of ",
        frames,
        " frames back (",
        drops,
        " dropped), ",
        cycles / u64::from(frames.max(1)),
        " cycles per frame, ",
        per_sec(u64::from(frames - drops)),
        " frames/s, ",
        per_sec(bytes_back) / 1000,
        " KB/s (",
        if n.behind {
            "behind the vIOMMU"
        } else {
            "no vIOMMU"
        },
        ")"
    );
    // Whether the drops are the back end's (DPDK drops a frame whose buffer missed in its
    // device IOTLB) is for the test to judge, from the VMM's miss count: no percentage here.
    check(drops < frames, "no frame came back")
}

/// The back end is made to touch IOVAs the guest did not map: a receive buffer the guest
/// unmapped after posting it (its page filled with a pattern), then a transmit buffer at an
/// IOVA never mapped. Each gets no translation, a fault event for the net endpoint with the
/// IOVA and the access, and no byte of guest memory changes; the vIOMMU keeps answering.
pub fn fault(n: &mut NetCtx, v: &mut Viommu) -> Result<(), &'static str> {
    check(n.behind, "the net device is not behind the vIOMMU")?;
    // A working round trip first (it also uses up the posted receive buffer).
    check(
        echo_one(n, Some(v), 100)?,
        "no frame came back before the test",
    )?;
    let (hdr, frame, _) = n.bufs;
    let ep = n.ep;
    let page = crate::mem::alloc_pages(1);
    let iova = NET_IOVA + 0x1000_0000;
    check(
        v.one(Req::Map(NET_DOM, iova, iova + 4095, page, MAP_W)) == OK,
        "MAP of the receive buffer",
    )?;
    let seq = n.seq;
    let dev = n.dev.as_mut().ok_or("no device")?;
    dev.post_rx(page, Some(iova));
    check(
        v.one(Req::Unmap(NET_DOM, iova, iova + 4095)) == OK,
        "UNMAP of the receive buffer",
    )?;
    fill(page, 4096, 0x5a);
    build(frame, &dev.mac, seq, 100);
    dev.send(hdr, frame, 100, None);
    let f = v
        .wait_fault(10_000)
        .ok_or("no fault event for the receive buffer")?;
    say!(
        "# net_fault: receive at ",
        crate::io::Hex(f.address),
        ": fault reason ",
        f.reason,
        " flags ",
        crate::io::Hex(u64::from(f.flags))
    );
    check(f.endpoint == ep, "the fault names another endpoint")?;
    check(f.address == iova, "the fault is not at the unmapped IOVA")?;
    check(f.flags & 2 != 0, "the fault is not a write")?;
    check(
        all_eq(page, 4096, 0x5a),
        "memory behind the unmapped IOVA changed",
    )?;
    check(
        dev.rx.pop_used().is_none(),
        "a frame was received into the unmapped buffer",
    )?;
    // Transmit from an IOVA never mapped.
    let never = NET_IOVA + 0x2000_0000;
    while dev.tx.pop_used().is_some() {}
    dev.send(hdr, frame, 100, Some(never));
    let f = v
        .wait_fault(10_000)
        .ok_or("no fault event for the transmit buffer")?;
    say!(
        "# net_fault: transmit at ",
        crate::io::Hex(f.address),
        ": fault reason ",
        f.reason,
        " flags ",
        crate::io::Hex(u64::from(f.flags))
    );
    check(f.endpoint == ep, "the fault names another endpoint")?;
    check(
        f.address == never,
        "the fault is not at the never-mapped IOVA",
    )?;
    check(f.flags & 1 != 0, "the fault is not a read")?;
    // The vIOMMU still answers: detach the device.
    check(
        v.one(Req::Detach(NET_DOM, ep)) == OK,
        "the vIOMMU stopped answering",
    )?;
    Ok(())
}

/// Transmit frames kept in flight at most, each in its own page (a frame the back end sends
/// late is never rewritten under it).
const TX_FRAMES: u64 = 8;
/// Receive buffers [`migrate`] rotates over, one per page.
const MIG_RX: usize = 64;
/// How much older than the frame awaited a received frame may be (late ones).
const LATE_SLACK: u32 = 8;

/// Checks the frame received into the buffer at `buf` (`len` bytes with the header) while
/// frame `awaited` was the newest sent: it must be a frame sent not long before (a late
/// one) and hold exactly that frame's bytes. Returns its sequence number.
fn received(
    buf: u64,
    expect: u64,
    mac: &[u8; 6],
    len: u32,
    awaited: u32,
    sent: u32,
) -> Option<u32> {
    let seq = u32::from_le_bytes(bytes(buf + HDR + 14, 4).try_into().ok()?);
    let size = SIZES[seq as usize % SIZES.len()];
    if seq >= sent || seq.saturating_add(LATE_SLACK) < awaited || len != size + HDR as u32 {
        return None;
    }
    build(expect, mac, seq, size);
    looped_back(buf, expect, mac, size).then_some(seq)
}

/// Frames looped back without end until `migrated()` says the VM runs elsewhere, then until
/// `after` more came back there. Receive buffers rotate over [`MIG_RX`] pages that the
/// guest's CPU neither writes nor reads until the buffer's turn comes again: only the back
/// end's writes (and its dirty log) carry a received frame through a migration. (Under the
/// shadow paging of these hosts a guest read of a page can make KVM log it dirty, which would
/// hide a lost back-end write.) Before a buffer is posted again it must hold the frame that
/// arrived in it; a frame that comes after its 300 ms (say across the migration's pause) is
/// recognised by its sequence number. Prints `# migrate-ready` after `ready` frames came
/// back. Returns `(frames back before the migration, after it, buffers that lost a frame)`.
pub fn migrate(
    n: &mut NetCtx,
    mut v: Option<&mut Viommu>,
    ready: u32,
    after: u32,
    migrated: &mut dyn FnMut() -> bool,
) -> Result<(u32, u32, u32), &'static str> {
    let iommu = n.behind && v.is_some();
    up(n, v.as_deref_mut())?;
    let (hdr, _, _) = n.bufs;
    let frames = crate::mem::alloc_pages(TX_FRAMES);
    let rx = crate::mem::alloc_pages(MIG_RX as u64);
    if let (true, Some(v)) = (iommu, v) {
        let st = v.batch(&[
            Req::Map(
                NET_DOM,
                frames + NET_IOVA,
                frames + NET_IOVA + TX_FRAMES * 4096 - 1,
                frames,
                MAP_R,
            ),
            Req::Map(
                NET_DOM,
                rx + NET_IOVA,
                rx + NET_IOVA + MIG_RX as u64 * 4096 - 1,
                rx,
                MAP_W,
            ),
        ]);
        check(st[..2] == [OK; 2], "MAP of the frames and buffers failed")?;
    }
    let expect = crate::mem::alloc_pages(1);
    // What arrived in each buffer: (frame awaited then, length). The CPU's own writes.
    let mut arrived = [None::<(u32, u32)>; MIG_RX];
    let (mut before, mut back_after, mut lost, mut drops, mut late) = (0u32, 0u32, 0u32, 0u32, 0);
    let mut moved = false;
    let mut b = 0usize;
    let mut posted = false;
    let mut sent = 0u32;
    // Frames not back in a row: drops are DPDK's (a buffer it missed on, a ring stopped with
    // a frame in it), and the test reads them; only a silent back end fails here.
    let mut silent = 0u32;
    let check_buffer =
        |i: usize, arrived: &[Option<(u32, u32)>; MIG_RX], mac: &[u8; 6], next: u32| {
            let Some((awaited, len)) = arrived[i] else {
                return Some(None);
            };
            received(rx + i as u64 * 4096, expect, mac, len, awaited, next).map(Some)
        };
    loop {
        let buf = rx + b as u64 * 4096;
        let dev = n.dev.as_mut().ok_or("no device")?;
        if !posted {
            match check_buffer(b, &arrived, &dev.mac, n.seq) {
                Some(Some(seq)) if seq != arrived[b].map_or(0, |a| a.0) => late += 1,
                Some(_) => {}
                None => {
                    if lost < 8 {
                        say!(
                            "# net_migrate: buffer ",
                            b,
                            " does not hold the frame that arrived in it",
                            if moved { " (after" } else { " (before" },
                            " the migration)"
                        );
                    }
                    lost += 1;
                }
            }
            arrived[b] = None;
            dev.post_rx(buf, None);
            posted = true;
        }
        // One frame at a time: the next goes once this one is back or given up on.
        let seq = n.seq;
        n.seq += 1;
        let size = SIZES[seq as usize % SIZES.len()];
        let frame = frames + u64::from(seq) % TX_FRAMES * 4096;
        build(frame, &dev.mac, seq, size);
        dev.send(hdr, frame, size, None);
        sent += 1;
        let Some(len) = wait_back(dev) else {
            drops += 1;
            silent += 1;
            // 100 frames in a row not back (30 s): the loop through the back end is broken.
            check(silent < 100, "no frame came back for 100 frames in a row")?;
            continue;
        };
        silent = 0;
        posted = false;
        arrived[b] = Some((seq, len));
        b = (b + 1) % MIG_RX;
        if moved {
            back_after += 1;
        } else {
            before += 1;
            if before == ready {
                say!("# migrate-ready");
            }
            if before % 500 == 0 {
                say!("# net_migrate: ", before, " frames back");
            }
        }
        if !moved && migrated() {
            moved = true;
            say!("# net_migrate: migrated after ", before, " frames back");
        }
        if moved && back_after >= after {
            break;
        }
        check(sent < 400_000, "the migration never came")?;
    }
    // The buffers not posted again yet.
    let mac = n.dev.as_ref().ok_or("no device")?.mac;
    for i in 0..MIG_RX {
        if check_buffer(i, &arrived, &mac, n.seq).is_none() {
            lost += 1;
        }
    }
    say!(
        "# net_migrate: ",
        before,
        " frames back before the migration, ",
        back_after,
        " after; ",
        drops,
        " not back in 300 ms (",
        late,
        " came late); ",
        lost,
        " buffers lost their frame"
    );
    check(lost == 0, "received frames were lost")?;
    Ok((before, back_after, lost))
}
