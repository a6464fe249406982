//! The test cases and their TAP output.

use crate::acpi;
use crate::dmadev::{self, DmaDev, Outcome};
use crate::io::Hex;
use crate::io::{cpuid, rd32, rd64, rd8, rdtsc, wr32};
use crate::mem::{all_eq, alloc_pages, bytes, fill, pattern, reserve_pages};
use crate::net::NetCtx;
use crate::pci::Func;
use crate::say;
use crate::viommu::{Req, Viommu, ATTACH_BYPASS, MAP_R, MAP_W};

const OK: u8 = 0;
const INVAL: u8 = 4;
const R_MAPPING: u8 = 2;
const F_WRITE: u32 = 2;
const F_ADDRESS: u32 = 1 << 8;
/// IOVAs the tests use (far from the GPAs, so that an IOVA is never mistaken for a GPA).
const IOVA: u64 = 0x80_0000_0000;

struct Ctx {
    viommu: Option<Viommu>,
    dev: Option<DmaDev>,
    /// A second DMA test device, if any: `(device, endpoint)`.
    dev2: Option<(DmaDev, u32)>,
    net: Option<NetCtx>,
    ep: u32,
    behind: bool,
    cmdline: &'static str,
}

type Case = fn(&mut Ctx) -> Result<(), &'static str>;

const CASES: &[(&str, Case)] = &[
    ("probe", probe),
    ("copy", copy),
    ("fill", fill_case),
    ("compare", compare),
    ("ro_fault", ro_fault),
    ("unmapped_fault", unmapped_fault),
    ("unmap_pending", unmap_pending),
    ("detach_reattach", detach_reattach),
    ("bypass", bypass),
    ("merge", merge),
    ("no_iommu", no_iommu),
    ("throughput", throughput),
    ("reuse", reuse),
    ("request_cost", request_cost),
    ("device_death", device_death),
    ("migrate_dma", migrate_dma),
    ("net_echo", net_echo),
    ("net_fault", net_fault),
    ("net_migrate", net_migrate),
    ("hostile_peer", hostile_peer),
    ("hostile_hang", hostile_hang),
    ("shared_domain", shared_domain),
    ("bar_latency", bar_latency),
];

fn cmdline(bp: u64) -> &'static str {
    let ptr = u64::from(rd32(bp + 0x228));
    let size = rd32(bp + 0x238).min(2048) as u64;
    let b = bytes(ptr, size);
    let n = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    core::str::from_utf8(&b[..n]).unwrap_or("")
}

fn param<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split(' ')
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// Runs the selected cases; returns the number that failed.
pub fn run(bp: u64) -> u32 {
    let cmd = cmdline(bp);
    say!("# test-guest: cmdline `", cmd, "`");
    let Some(platform) = acpi::platform(rd64(bp + 0x70)) else {
        say!("Bail out! no ACPI MCFG");
        return 100;
    };
    let mut ctx = Ctx {
        viommu: None,
        dev: None,
        dev2: None,
        net: None,
        ep: 0,
        behind: false,
        cmdline: cmd,
    };
    for d in 0..32u8 {
        let Some(f) = Func::probe(platform.ecam, d) else {
            continue;
        };
        match f.ids() {
            (0x1af4, 0x1057) => ctx.viommu = Viommu::new(&f),
            (0x1af4, 0x1041) => {
                let ep = u32::from(d) << 3;
                ctx.net = Some(NetCtx::new(f, ep, platform.endpoints & (1 << d) != 0));
            }
            ids if ids == dmadev::IDS && ctx.dev.is_some() => {
                ctx.dev2 = Some((DmaDev::new(&f), u32::from(d) << 3));
            }
            ids if ids == dmadev::IDS => {
                ctx.ep = u32::from(d) << 3;
                ctx.behind = platform.endpoints & (1 << d) != 0;
                ctx.dev = Some(DmaDev::new(&f));
            }
            _ => {}
        }
    }
    say!(
        "# devices: virtio-iommu ",
        if ctx.viommu.is_some() {
            "found"
        } else {
            "absent"
        },
        " (VIOT: 00:",
        Hex(u64::from(platform.iommu_dev.unwrap_or(0xff))),
        "), dma test device ",
        if ctx.dev.is_some() { "found" } else { "absent" },
        " (endpoint ",
        Hex(u64::from(ctx.ep)),
        ", ",
        if ctx.behind {
            "behind the vIOMMU"
        } else {
            "not behind the vIOMMU"
        },
        ")"
    );
    let selected = param(cmd, "tests");
    let wanted = |name: &str| match selected {
        Some(list) => list.split(',').any(|t| t == name),
        None => {
            !matches!(
                name,
                "device_death"
                    | "no_iommu"
                    | "throughput"
                    | "reuse"
                    | "migrate_dma"
                    | "request_cost"
                    | "hostile_peer"
                    | "hostile_hang"
                    | "shared_domain"
                    | "bar_latency"
            ) && !name.starts_with("net_")
        }
    };
    let n = CASES.iter().filter(|(name, _)| wanted(name)).count();
    say!("TAP version 13");
    say!("1..", n);
    let mut failures = 0;
    let mut i = 0;
    for (name, case) in CASES {
        if !wanted(name) {
            continue;
        }
        i += 1;
        let needs_iommu = !matches!(
            *name,
            "no_iommu" | "throughput" | "reuse" | "device_death" | "net_echo"
        );
        let r = if name.starts_with("net_") {
            match &ctx.net {
                None => Err("no virtio-net device"),
                Some(n) if needs_iommu && (ctx.viommu.is_none() || !n.behind) => {
                    say!(
                        "ok ",
                        i,
                        " - ",
                        *name,
                        " # SKIP the device is not behind the vIOMMU"
                    );
                    continue;
                }
                Some(_) => case(&mut ctx),
            }
        } else if ctx.dev.is_none() {
            Err("no DMA test device")
        } else if needs_iommu && (ctx.viommu.is_none() || !ctx.behind) {
            say!(
                "ok ",
                i,
                " - ",
                *name,
                " # SKIP the device is not behind the vIOMMU"
            );
            continue;
        } else {
            case(&mut ctx)
        };
        match r {
            Ok(()) => say!("ok ", i, " - ", *name),
            Err(why) => {
                failures += 1;
                say!("not ok ", i, " - ", *name, " # ", why);
            }
        }
    }
    if let Some(v) = &ctx.viommu {
        say!("# virtio-iommu requests sent: ", v.sent);
    }
    say!(
        "# guest done: ",
        n as u32 - failures,
        " passed, ",
        failures,
        " failed"
    );
    failures
}

fn check(cond: bool, why: &'static str) -> Result<(), &'static str> {
    if cond {
        Ok(())
    } else {
        Err(why)
    }
}

fn viommu(c: &mut Ctx) -> &mut Viommu {
    c.viommu.as_mut().expect("checked by run()")
}

fn dev(c: &Ctx) -> &DmaDev {
    c.dev.as_ref().expect("checked by run()")
}

/// Attaches the device to `dom` and maps `pages` pages at `iova` -> `gpa` with `flags`.
fn setup(
    c: &mut Ctx,
    dom: u32,
    iova: u64,
    gpa: u64,
    pages: u64,
    flags: u32,
) -> Result<(), &'static str> {
    let ep = c.ep;
    let v = viommu(c);
    check(v.one(Req::Attach(dom, ep, 0)) == OK, "ATTACH failed")?;
    check(
        v.one(Req::Map(dom, iova, iova + pages * 4096 - 1, gpa, flags)) == OK,
        "MAP failed",
    )
}

fn unmap_all(c: &mut Ctx, dom: u32) {
    viommu(c).one(Req::Unmap(dom, 0, u64::MAX));
}

fn expect_fault(c: &mut Ctx, out: Outcome, iova: u64) -> Result<(), &'static str> {
    check(
        out.status == dmadev::ERROR_STATUS,
        "the device did not report an error",
    )?;
    check(
        out.error == dmadev::ERR_FAULT_WRITE,
        "the error is not a write fault",
    )?;
    check(out.fault_iova == iova, "wrong faulting IOVA in the device")?;
    let ep = c.ep;
    let f = viommu(c).wait_fault(10_000).ok_or("no fault event")?;
    check(f.reason == R_MAPPING, "fault reason is not MAPPING")?;
    check(f.endpoint == ep, "fault names another endpoint")?;
    check(f.address == iova, "fault address")?;
    check(f.flags == F_WRITE | F_ADDRESS, "fault flags")
}

fn probe(c: &mut Ctx) -> Result<(), &'static str> {
    let ep = c.ep;
    let v = viommu(c);
    check(
        v.page_size_mask & 0xfff == 0 && v.page_size_mask & 0x1000 != 0,
        "granule is not 4 KiB",
    )?;
    let (st, (ty, subtype, start, end)) = v.probe(ep);
    check(st == OK, "PROBE failed")?;
    check(
        ty == 1 && subtype == 1,
        "first property is not RESV_MEM MSI",
    )?;
    check(start == 0xfee0_0000 && end == 0xfeef_ffff, "MSI region")?;
    check(
        v.probe(0xdead).0 == 6,
        "PROBE of an unknown endpoint is not NOENT",
    )
}

fn copy(c: &mut Ctx) -> Result<(), &'static str> {
    let src = alloc_pages(16);
    let dst = alloc_pages(18);
    pattern(src, 65536, 7);
    fill(dst, 18 * 4096, 0xcc);
    setup(c, 1, IOVA, src, 16, MAP_R)?;
    check(
        viommu(c).one(Req::Map(
            1,
            IOVA + 0x10_0000,
            IOVA + 0x10_0000 + 16 * 4096 - 1,
            dst + 4096,
            MAP_W | MAP_R,
        )) == OK,
        "MAP dst",
    )?;
    let out = dev(c).run(dmadev::OP_COPY, IOVA, IOVA + 0x10_0000, 65536, 0);
    unmap_all(c, 1);
    check(out.status == dmadev::DONE, "copy did not complete")?;
    check(
        bytes(dst + 4096, 65536) == bytes(src, 65536),
        "copied bytes differ",
    )?;
    check(all_eq(dst, 4096, 0xcc), "page before dst touched")?;
    check(
        all_eq(dst + 17 * 4096, 4096, 0xcc),
        "page after dst touched",
    )
}

fn fill_case(c: &mut Ctx) -> Result<(), &'static str> {
    let dst = alloc_pages(4);
    fill(dst, 4 * 4096, 0x11);
    setup(c, 1, IOVA, dst, 4, MAP_W)?;
    let out = dev(c).run(dmadev::OP_FILL, 0, IOVA + 100, 10_000, 0xab);
    unmap_all(c, 1);
    check(out.status == dmadev::DONE, "fill did not complete")?;
    check(all_eq(dst, 100, 0x11), "bytes before touched")?;
    check(all_eq(dst + 100, 10_000, 0xab), "fill bytes")?;
    check(
        all_eq(dst + 10_100, 4 * 4096 - 10_100, 0x11),
        "bytes after touched",
    )
}

fn compare(c: &mut Ctx) -> Result<(), &'static str> {
    let a = alloc_pages(2);
    let b = alloc_pages(2);
    pattern(a, 8192, 3);
    pattern(b, 8192, 3);
    setup(c, 1, IOVA, a, 2, MAP_R)?;
    check(
        viommu(c).one(Req::Map(1, IOVA + 0x4000, IOVA + 0x5fff, b, MAP_R)) == OK,
        "MAP b",
    )?;
    let same = dev(c).run(dmadev::OP_COMPARE, IOVA, IOVA + 0x4000, 8192, 0);
    bytes(b, 8192)[5000] ^= 1;
    let diff = dev(c).run(dmadev::OP_COMPARE, IOVA, IOVA + 0x4000, 8192, 0);
    unmap_all(c, 1);
    check(
        same.status == dmadev::DONE && same.result == 0,
        "equal buffers compare different",
    )?;
    check(diff.result == 5001, "difference not at byte 5000")
}

fn ro_fault(c: &mut Ctx) -> Result<(), &'static str> {
    let src = alloc_pages(1);
    let dst = alloc_pages(1);
    pattern(src, 4096, 9);
    fill(dst, 4096, 0x77);
    setup(c, 1, IOVA, src, 1, MAP_R)?;
    // The destination is mapped read-only: the device may not write it.
    check(
        viommu(c).one(Req::Map(1, IOVA + 0x1000, IOVA + 0x1fff, dst, MAP_R)) == OK,
        "MAP dst",
    )?;
    let out = dev(c).run(dmadev::OP_COPY, IOVA, IOVA + 0x1000, 4096, 0);
    unmap_all(c, 1);
    check(all_eq(dst, 4096, 0x77), "read-only memory was written")?;
    expect_fault(c, out, IOVA + 0x1000)
}

fn unmapped_fault(c: &mut Ctx) -> Result<(), &'static str> {
    let src = alloc_pages(1);
    setup(c, 1, IOVA, src, 1, MAP_R)?;
    let out = dev(c).run(dmadev::OP_FILL, 0, IOVA + 0x40_0000, 64, 0x42);
    unmap_all(c, 1);
    expect_fault(c, out, IOVA + 0x40_0000)
}

fn unmap_pending(c: &mut Ctx) -> Result<(), &'static str> {
    const PAGES: u64 = 64;
    let src = alloc_pages(PAGES);
    let dst = alloc_pages(PAGES);
    pattern(src, PAGES * 4096, 1);
    setup(c, 1, IOVA, src, PAGES, MAP_R)?;
    let d = IOVA + 0x100_0000;
    check(
        viommu(c).one(Req::Map(1, d, d + PAGES * 4096 - 1, dst, MAP_W)) == OK,
        "MAP dst",
    )?;
    // A slow copy: 20 ms per page.
    dev(c).start(dmadev::OP_COPY, IOVA, d, PAGES * 4096, 0, 20_000);
    let deadline = crate::io::Deadline::in_ms(60_000);
    while dev(c).progress() < 4 * 4096 && !deadline.passed() {
        core::hint::spin_loop();
    }
    check(
        dev(c).status() == dmadev::BUSY,
        "the transfer ended before the UNMAP",
    )?;
    // Once the UNMAP completes the device must not reach those pages again.
    check(
        viommu(c).one(Req::Unmap(1, d, d + PAGES * 4096 - 1)) == OK,
        "UNMAP dst",
    )?;
    fill(dst, PAGES * 4096, 0x5a);
    let out = dev(c).wait();
    unmap_all(c, 1);
    check(
        out.status == dmadev::ERROR_STATUS,
        "the transfer did not fault after the UNMAP",
    )?;
    check(
        all_eq(dst, PAGES * 4096, 0x5a),
        "the device wrote after the UNMAP",
    )?;
    let f = viommu(c).wait_fault(10_000).ok_or("no fault event")?;
    check(f.address == out.fault_iova, "fault event address")
}

fn detach_reattach(c: &mut Ctx) -> Result<(), &'static str> {
    let buf = alloc_pages(2);
    let ep = c.ep;
    setup(c, 2, IOVA, buf, 2, MAP_R | MAP_W)?;
    check(
        dev(c).run(dmadev::OP_FILL, 0, IOVA, 8192, 1).status == dmadev::DONE,
        "fill while attached",
    )?;
    check(viommu(c).one(Req::Detach(2, ep)) == OK, "DETACH")?;
    let out = dev(c).run(dmadev::OP_FILL, 0, IOVA, 64, 2);
    check(
        out.status == dmadev::ERROR_STATUS,
        "DMA works while detached",
    )?;
    viommu(c)
        .wait_fault(10_000)
        .ok_or("no fault event for the DMA while detached")?;
    check(all_eq(buf, 64, 1), "memory written while detached")?;
    // The domain died with its last endpoint: attach again and map again.
    setup(c, 2, IOVA, buf, 2, MAP_R | MAP_W)?;
    let out = dev(c).run(dmadev::OP_FILL, 0, IOVA, 8192, 3);
    unmap_all(c, 2);
    check(out.status == dmadev::DONE, "fill after re-attach")?;
    check(all_eq(buf, 8192, 3), "fill bytes after re-attach")
}

fn bypass(c: &mut Ctx) -> Result<(), &'static str> {
    let src = alloc_pages(1);
    let dst = alloc_pages(1);
    pattern(src, 4096, 5);
    let ep = c.ep;
    let v = viommu(c);
    check(
        v.one(Req::Attach(3, ep, ATTACH_BYPASS)) == OK,
        "ATTACH bypass",
    )?;
    check(
        v.one(Req::Map(3, 0, 0xfff, 0, MAP_R)) == INVAL,
        "MAP on a bypass domain is not INVAL",
    )?;
    // In a bypass domain IOVA = GPA.
    let out = dev(c).run(dmadev::OP_COPY, src, dst, 4096, 0);
    check(out.status == dmadev::DONE, "copy through the bypass domain")?;
    check(bytes(dst, 4096) == bytes(src, 4096), "bypass copy bytes")?;
    // Back to a translated domain for later cases.
    check(viommu(c).one(Req::Attach(1, ep, 0)) == OK, "ATTACH back")
}

fn merge(c: &mut Ctx) -> Result<(), &'static str> {
    const PAGES: u64 = 64;
    let src = alloc_pages(PAGES);
    let dst = alloc_pages(PAGES);
    pattern(src, PAGES * 4096, 11);
    let ep = c.ep;
    check(viommu(c).one(Req::Attach(1, ep, 0)) == OK, "ATTACH")?;
    // 64 page-sized MAPs, contiguous in IOVA and GPA, in batches of 8 per notification.
    for base in [(IOVA, src, MAP_R), (IOVA + 0x100_0000, dst, MAP_W)] {
        for chunk in 0..PAGES / 8 {
            let mut reqs = [Req::Unmap(0, 0, 0); 8];
            for (k, r) in reqs.iter_mut().enumerate() {
                let p = chunk * 8 + k as u64;
                *r = Req::Map(
                    1,
                    base.0 + p * 4096,
                    base.0 + p * 4096 + 4095,
                    base.1 + p * 4096,
                    base.2,
                );
            }
            let st = viommu(c).batch(&reqs);
            check(st.iter().all(|&s| s == OK), "a batched MAP failed")?;
        }
    }
    let out = dev(c).run(dmadev::OP_COPY, IOVA, IOVA + 0x100_0000, PAGES * 4096, 0);
    unmap_all(c, 1);
    check(out.status == dmadev::DONE, "copy across 64 mappings")?;
    check(
        bytes(dst, PAGES * 4096) == bytes(src, PAGES * 4096),
        "copied bytes",
    )
}

fn no_iommu(c: &mut Ctx) -> Result<(), &'static str> {
    check(!c.behind, "the device is behind the vIOMMU")?;
    let src = alloc_pages(4);
    let dst = alloc_pages(4);
    pattern(src, 16384, 13);
    let out = dev(c).run(dmadev::OP_COPY, src, dst, 16384, 0);
    check(out.status == dmadev::DONE, "copy at GPAs")?;
    say!("# no_iommu wrote: ", Hex(dst >> 12), " +4 pages");
    check(bytes(dst, 16384) == bytes(src, 16384), "copied bytes")
}

/// TSC kHz from the VMM's timing leaf (0x40000010), if present.
pub(crate) fn tsc_khz() -> u64 {
    let (max, ..) = cpuid(0x4000_0000);
    if max >= 0x4000_0010 {
        u64::from(cpuid(0x4000_0010).0)
    } else {
        0
    }
}

/// The VMM's cost per virtio-iommu request as the guest sees it: TSC cycles from the
/// notification to the used-ring update, median of 64 runs, for a request the device does
/// not know (the baseline: the transport alone), one MAP, one UNMAP, and batches of 16 MAPs
/// and 16 UNMAPs. Prints `# request_cost: <what> <cycles> cycles <ns> ns, +<cycles> over the
/// baseline`.
/// BAR read latency: the ID register in BAR 0 (always a message to the device process)
/// against BAR 2 (device memory the VMM maps into the guest when the device offers it),
/// median cycles of 64 reads each; BAR 2 must hold the device's magic and keep what the
/// guest writes. Prints how many BAR 2 accesses reached the device as messages.
fn bar_latency(c: &mut Ctx) -> Result<(), &'static str> {
    const RUNS: usize = 64;
    let d = dev(c);
    check(d.bar2 != 0, "no BAR 2")?;
    let before = d.bar2_messages();
    let mut bar0 = [0u64; RUNS];
    let mut bar2 = [0u64; RUNS];
    for i in 0..RUNS {
        let t = rdtsc();
        let id = d.id();
        bar0[i] = rdtsc() - t;
        check(id == 0x7eed_d4a7, "BAR 0 ID")?;
        let t = rdtsc();
        let v = rd32(d.bar2);
        bar2[i] = rdtsc() - t;
        check(
            v == dmadev::BAR2_MAGIC,
            "BAR 2 does not hold the device's magic",
        )?;
    }
    wr32(d.bar2 + 0x10, 0x1234_5678);
    check(rd32(d.bar2 + 0x10) == 0x1234_5678, "BAR 2 lost a write")?;
    let messages = d.bar2_messages() - before;
    // The doorbell, with a zero length: the device must refuse the operation, whichever way
    // the write reached it (a message, or its ioeventfd drained before this status read).
    let rings = d.doorbell_messages();
    d.start(dmadev::OP_FILL, 0, 0, 0, 0, 0);
    let out = d.wait();
    check(
        out.status == dmadev::ERROR_STATUS && out.error == dmadev::ERR_BAD_LEN,
        "the doorbell did not reach the device",
    )?;
    let rings = d.doorbell_messages() - rings;
    bar0.sort_unstable();
    bar2.sort_unstable();
    say!(
        "# bar_latency: BAR 0 register ",
        bar0[RUNS / 2],
        " cycles, BAR 2 ",
        bar2[RUNS / 2],
        " cycles (medians of ",
        RUNS as u64,
        "); BAR 2 accesses by message: ",
        messages,
        "; doorbells by message: ",
        rings
    );
    Ok(())
}

fn request_cost(c: &mut Ctx) -> Result<(), &'static str> {
    if !c.behind {
        return Err("needs the device behind the vIOMMU");
    }
    const RUNS: usize = 64;
    let (dom, ep) = (9, c.ep);
    check(
        viommu(c).one(Req::Attach(dom, ep, 0)) == OK,
        "ATTACH failed",
    )?;
    let gpa = alloc_pages(16);
    let base = IOVA + 0x20_0000_0000;
    let median = |v: &mut [u64; RUNS]| {
        v.sort_unstable();
        v[RUNS / 2]
    };
    let maps = |k: u64| {
        let mut r = [Req::Noop; 16];
        for (i, x) in r.iter_mut().enumerate() {
            let iova = base + (k * 16 + i as u64) * 0x1000;
            *x = Req::Map(
                dom,
                iova,
                iova + 0xfff,
                gpa + (i as u64) * 0x1000,
                MAP_R | MAP_W,
            );
        }
        r
    };
    let unmaps = |k: u64| {
        let mut r = [Req::Noop; 16];
        for (i, x) in r.iter_mut().enumerate() {
            let iova = base + (k * 16 + i as u64) * 0x1000;
            *x = Req::Unmap(dom, iova, iova + 0xfff);
        }
        r
    };
    let mut noop = [0u64; RUNS];
    let mut map1 = [0u64; RUNS];
    let mut unmap1 = [0u64; RUNS];
    let mut map16 = [0u64; RUNS];
    let mut unmap16 = [0u64; RUNS];
    for k in 0..RUNS {
        noop[k] = viommu(c).timed_batch(&[Req::Noop]);
        let (m, u) = (maps(k as u64), unmaps(k as u64));
        map1[k] = viommu(c).timed_batch(&m[..1]);
        unmap1[k] = viommu(c).timed_batch(&u[..1]);
        map16[k] = viommu(c).timed_batch(&m);
        unmap16[k] = viommu(c).timed_batch(&u);
    }
    let khz = tsc_khz().max(1);
    let base_cycles = median(&mut noop);
    for (what, v) in [
        ("no-op", &mut noop),
        ("MAP", &mut map1),
        ("UNMAP", &mut unmap1),
        ("16 MAPs", &mut map16),
        ("16 UNMAPs", &mut unmap16),
    ] {
        let m = median(v);
        check(m != u64::MAX, "a request got no answer")?;
        say!(
            "# request_cost: ",
            what,
            " ",
            m,
            " cycles ",
            m * 1_000_000 / khz,
            " ns, +",
            m.saturating_sub(base_cycles),
            " cycles over the baseline"
        );
    }
    check(viommu(c).one(Req::Detach(dom, ep)) == OK, "DETACH failed")
}

/// The addresses the device copies `size` bytes between, from GPA `src` to GPA `dst`: behind
/// the vIOMMU, `src` mapped read-only at `IOVA` and `dst` write-only 256 MiB above, in
/// domain 1 (`unmap_all(c, 1)` undoes it); without it, the GPAs.
fn copy_pair(c: &mut Ctx, src: u64, dst: u64, size: u64) -> Result<(u64, u64), &'static str> {
    if !c.behind {
        return Ok((src, dst));
    }
    setup(c, 1, IOVA, src, size / 4096, MAP_R)?;
    let d = IOVA + 0x1000_0000;
    check(
        viommu(c).one(Req::Map(1, d, d + size - 1, dst, MAP_W)) == OK,
        "MAP dst",
    )?;
    Ok((IOVA, d))
}

fn throughput(c: &mut Ctx) -> Result<(), &'static str> {
    for &(size, rounds) in &[(4096u64, 64u64), (1 << 20, 8)] {
        let pages = size / 4096;
        let src = alloc_pages(pages);
        let dst = alloc_pages(pages);
        pattern(src, size, 17);
        let (s, d) = copy_pair(c, src, dst, size)?;
        let t0 = rdtsc();
        for _ in 0..rounds {
            check(
                dev(c).run(dmadev::OP_COPY, s, d, size, 0).status == dmadev::DONE,
                "copy",
            )?;
        }
        let cycles = rdtsc() - t0;
        if c.behind {
            unmap_all(c, 1);
        }
        let khz = tsc_khz();
        let bytes_moved = size * rounds;
        let mbps = if khz > 0 && cycles > 0 {
            bytes_moved * khz / cycles / 1000
        } else {
            0
        };
        say!(
            "# throughput: ",
            size,
            " bytes x ",
            rounds,
            ": ",
            cycles,
            " cycles, ",
            mbps,
            " MB/s (",
            if c.behind {
                "behind the vIOMMU"
            } else {
                "no vIOMMU"
            },
            ")"
        );
        check(bytes(dst, size) == bytes(src, size), "copied bytes")?;
    }
    Ok(())
}

/// The table of the "IOPF support for VFIO passthrough" RFC: a buffer of 1 MiB and one of 10 MiB, mapped
/// once and copied 1, 100 and 1000 times, each configuration on fresh buffers (so under
/// `dma=fault` its first use makes the page requests). Prints the cycles and the page
/// requests the device made (0 under static mapping) per configuration.
fn reuse(c: &mut Ctx) -> Result<(), &'static str> {
    for &size in &[1u64 << 20, 10 << 20] {
        for &uses in &[1u64, 100, 1000] {
            let pages = size / 4096;
            // Not cleared: filling 20 MiB would be minutes of emulated stores.
            let src = reserve_pages(pages);
            let dst = reserve_pages(pages);
            let (s, d) = copy_pair(c, src, dst, size)?;
            let requests = dev(c).page_requests();
            let t0 = rdtsc();
            for _ in 0..uses {
                check(
                    dev(c).run(dmadev::OP_COPY, s, d, size, 0).status == dmadev::DONE,
                    "copy",
                )?;
            }
            let cycles = rdtsc() - t0;
            let requests = dev(c).page_requests() - requests;
            if c.behind {
                unmap_all(c, 1);
            }
            say!(
                "# reuse: ",
                size,
                " bytes x ",
                uses,
                ": ",
                cycles,
                " cycles, ",
                requests,
                " page requests"
            );
        }
    }
    Ok(())
}

fn device_death(c: &mut Ctx) -> Result<(), &'static str> {
    check(dev(c).alive(), "the device is not there")?;
    // A transfer in flight when the device dies: a 64-page fill at 20 ms per page, mapped
    // behind the vIOMMU when there is one.
    let buf = alloc_pages(64);
    let dst = if c.behind && c.viommu.is_some() {
        setup(c, 7, IOVA, buf, 64, MAP_W)?;
        IOVA
    } else {
        buf
    };
    dev(c).start(dmadev::OP_FILL, 0, dst, 64 * 4096, 0x6d, 20_000);
    let deadline = crate::io::Deadline::in_ms(60_000);
    while dev(c).progress() == 0 {
        check(!deadline.passed(), "the transfer never started")?;
        core::hint::spin_loop();
    }
    say!(
        "# ready-for-kill (transfer in flight: ",
        dev(c).progress(),
        " bytes done)"
    );
    let deadline = crate::io::Deadline::in_ms(120_000);
    while dev(c).alive() {
        if deadline.passed() {
            return Err("the device never went away");
        }
        core::hint::spin_loop();
    }
    crate::io::puts("# the device is gone (its registers read all ones); ");
    // The rest of the platform still works.
    if let Some(v) = c.viommu.as_mut() {
        let st = v.one(Req::Attach(9, 0x7f8, 0));
        say!(
            "virtio-iommu still answers (ATTACH of a bad endpoint: status ",
            st,
            ")"
        );
        check(st == 6, "the virtio-iommu does not answer")?;
    } else {
        say!("no vIOMMU");
    }
    let _ = rd8(0);
    Ok(())
}

/// DMA through changing mappings, long enough to be migrated while it runs: each iteration
/// maps a 64 KiB window of a 1 MiB area at a new IOVA, has the device fill it with the
/// iteration's value slowly (`delay=` microseconds per 4 KiB, so that a transfer is in flight
/// when a migration stops the guest), unmaps it and records the value. A canary mapping made
/// at the start stays for the whole run. At the end every page must hold the value of its
/// last fill (none lost, none stale) and the device must still reach the canary.
///
/// Parameters: `iters=` (400), `ready=` (iteration after which `# migrate-ready` is
/// printed, 5), `delay=` (1500), `touch=` (MiB of RAM the device fills first, so that a
/// migration has that much to copy; 0), `until_migrated=1`: keep going until the device's
/// instance register changes (the VM now runs on another VMM with another device process),
/// then do `iters` more iterations there, so that a migration always lands mid-run however
/// long it takes (at most 200,000 iterations in all).
fn migrate_dma(c: &mut Ctx) -> Result<(), &'static str> {
    const PAGES: u64 = 256;
    const WIN: u64 = 16;
    const CANARY: u64 = IOVA + 0x7f00_0000;
    let num = |key: &str, default: u64| {
        param(c.cmdline, key)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(default)
    };
    let (iters, ready, delay) = (num("iters", 400), num("ready", 5), num("delay", 1500));
    // `high=1`: the DMA area, the expected values and the bulk fill live in RAM above the
    // PCI hole (the VM's second memory region), which the test gave the VM.
    if num("high", 0) == 1 {
        crate::mem::allocate_above_4g();
        say!(
            "# migrate_dma: buffers above 4 GiB from ",
            Hex(crate::mem::next_page())
        );
    }
    let area = alloc_pages(PAGES);
    let expect = alloc_pages(1);
    let canary = alloc_pages(1);
    let ep = c.ep;
    check(viommu(c).one(Req::Attach(1, ep, 0)) == OK, "ATTACH failed")?;
    check(
        viommu(c).one(Req::Map(1, CANARY, CANARY + 4095, canary, MAP_R | MAP_W)) == OK,
        "MAP of the canary failed",
    )?;
    // Bulk RAM for the migration to copy, written by the device (the CPU would take minutes
    // in the emulator): 64 MiB per transfer through a temporary mapping.
    let touch = num("touch", 0) << 20;
    // Where the device writes (page numbers): the area, the canary (at the end) and the
    // bulk fill.
    say!(
        "# migrate_dma: device writes pages ",
        Hex(area >> 12),
        " +",
        PAGES,
        ", ",
        Hex(canary >> 12),
        " +1, ",
        Hex(crate::mem::next_page() >> 12),
        " +",
        touch >> 12
    );
    if touch > 0 {
        let base = reserve_pages(touch / 4096);
        let mut done = 0;
        while done < touch {
            let n = (touch - done).min(64 << 20);
            let iova = IOVA + 0x40_0000_0000;
            check(
                viommu(c).one(Req::Map(1, iova, iova + n - 1, base + done, MAP_W)) == OK,
                "MAP of the bulk area failed",
            )?;
            let out = dev(c).run(dmadev::OP_FILL, 0, iova, n, 0x5a);
            viommu(c).one(Req::Unmap(1, iova, iova + n - 1));
            check(out.status == dmadev::DONE, "bulk fill failed")?;
            done += n;
        }
        say!("# migrate_dma: device filled ", touch >> 20, " MiB");
    }
    let t0 = rdtsc();
    let mut stale = 0u64;
    let until_migrated = num("until_migrated", 0) == 1;
    let instance = dev(c).instance();
    let mut end = if until_migrated { 200_000 } else { iters };
    let mut migrated_at = None;
    let mut it = 0;
    while it < end {
        let w = (it * 7) % (PAGES / WIN);
        let iova = IOVA + ((it % 97) << 20);
        let gpa = area + w * WIN * 4096;
        let v = (it % 255 + 1) as u8;
        // Before the window is filled again, each of its pages must still hold the value of
        // its last fill: a write lost in a migration shows here, before it is overwritten.
        for p in 0..WIN {
            let want = u64::from(bytes(expect + w * WIN + p, 1)[0]) * 0x0101_0101_0101_0101;
            let page = gpa + p * 4096;
            if rd64(page) != want || rd64(page + 4088) != want {
                if stale < 8 {
                    say!(
                        "# migrate_dma: iteration ",
                        it,
                        ": page ",
                        w * WIN + p,
                        " is stale (",
                        Hex(rd64(page)),
                        ", expected ",
                        Hex(want),
                        ")"
                    );
                }
                stale += 1;
            }
        }
        check(
            viommu(c).one(Req::Map(1, iova, iova + WIN * 4096 - 1, gpa, MAP_R | MAP_W)) == OK,
            "MAP failed",
        )?;
        dev(c).start(dmadev::OP_FILL, 0, iova, WIN * 4096, v, delay as u32);
        let out = dev(c).wait();
        check(
            viommu(c).one(Req::Unmap(1, iova, iova + WIN * 4096 - 1)) == OK,
            "UNMAP failed",
        )?;
        if out.status != dmadev::DONE {
            say!(
                "# migrate_dma: iteration ",
                it,
                " ended with status ",
                out.status,
                " error ",
                out.error
            );
            return Err("a fill did not complete");
        }
        // A runtime length: LLVM would inline a 16-byte fill with SSE, which the emulator
        // refuses.
        fill(expect + w * WIN, core::hint::black_box(WIN), v);
        if it + 1 == ready {
            say!("# migrate-ready");
        }
        if it % 100 == 0 {
            say!("# migrate_dma: iteration ", it);
        }
        if until_migrated && migrated_at.is_none() && dev(c).instance() != instance {
            say!("# migrate_dma: migrated after iteration ", it);
            migrated_at = Some(it);
            end = it + 1 + iters;
        }
        it += 1;
    }
    check(!until_migrated || migrated_at.is_some(), "never migrated")?;
    let mut wrong = 0u64;
    for p in 0..PAGES {
        let want = bytes(expect + p, 1)[0];
        if !all_eq(area + p * 4096, 4096, want) {
            if wrong < 8 {
                say!(
                    "# migrate_dma: page ",
                    p,
                    " holds ",
                    Hex(u64::from(bytes(area + p * 4096, 1)[0])),
                    ", its last fill was ",
                    Hex(u64::from(want))
                );
            }
            wrong += 1;
        }
    }
    say!(
        "# migrate_dma: ",
        it,
        " fills in ",
        (rdtsc() - t0) >> 20,
        " Mcycles; ",
        stale,
        " stale pages seen before a refill, ",
        wrong,
        " of ",
        PAGES,
        " pages wrong at the end"
    );
    check(stale == 0 && wrong == 0, "pages lost device writes")?;
    let out = dev(c).run(dmadev::OP_FILL, 0, CANARY, 4096, 0x6c);
    check(
        out.status == dmadev::DONE && all_eq(canary, 4096, 0x6c),
        "the canary mapping is gone",
    )?;
    unmap_all(c, 1);
    check(viommu(c).one(Req::Detach(1, ep)) == OK, "DETACH failed")
}

fn net_echo(c: &mut Ctx) -> Result<(), &'static str> {
    let frames = param(c.cmdline, "net_frames")
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let khz = tsc_khz();
    let n = c.net.as_mut().ok_or("no virtio-net device")?;
    let v = if n.behind { c.viommu.as_mut() } else { None };
    crate::net::echo(n, v, frames, khz)
}

/// Frames looped back by the back end through a live migration (see `net::migrate`): the
/// DMA test device's instance register says when the VM runs on the other VMM (with its own
/// testpmd). Parameters: `ready=` (frames before `# migrate-ready`, 20), `net_after=` (frames
/// back after the migration, 100).
fn net_migrate(c: &mut Ctx) -> Result<(), &'static str> {
    let num = |key: &str, default: u32| {
        param(c.cmdline, key)
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(default)
    };
    let (ready, after) = (num("ready", 20), num("net_after", 100));
    let instance = c.dev.as_ref().ok_or("no DMA test device")?.instance();
    let Ctx {
        net, viommu, dev, ..
    } = c;
    let dev = dev.as_ref().ok_or("no DMA test device")?;
    let n = net.as_mut().ok_or("no virtio-net device")?;
    let v = if n.behind { viommu.as_mut() } else { None };
    crate::net::migrate(n, v, ready, after, &mut || dev.instance() != instance).map(|_| ())
}

fn net_fault(c: &mut Ctx) -> Result<(), &'static str> {
    let n = c.net.as_mut().ok_or("no virtio-net device")?;
    let v = c.viommu.as_mut().ok_or("no virtio-iommu")?;
    crate::net::fault(n, v)
}

/// The DMA test device's server never answers a DMA_MAP (the test harness puts a proxy in
/// front of it that hangs on the first one). While the guest's MAP for it waits on the
/// server, the virtio-iommu's configuration still answers this vCPU, before the MAP's reply;
/// the MAP then fails once the VMM's deadline marks the device failed, and the vIOMMU
/// answers the next request.
fn hostile_hang(c: &mut Ctx) -> Result<(), &'static str> {
    let ep = c.ep;
    let page = alloc_pages(1);
    let v = viommu(c);
    check(v.one(Req::Attach(13, ep, 0)) == OK, "ATTACH failed")?;
    v.submit(Req::Map(13, IOVA, IOVA + 0xfff, page, MAP_R | MAP_W));
    // Time for the VMM to take the request up (its host call then waits on the server).
    for _ in 0..20_000u32 {
        core::hint::spin_loop();
    }
    let mask = v.read_page_size_mask();
    let early = v.answered();
    check(mask == v.page_size_mask, "the configuration read changed")?;
    check(
        early.is_none(),
        "the configuration read returned only after the MAP's answer",
    )?;
    let mut status = None;
    for _ in 0..4_000_000_000u64 {
        status = v.answered();
        if status.is_some() {
            break;
        }
        core::hint::spin_loop();
    }
    let status = status.ok_or("the MAP was never answered")?;
    say!(
        "# hostile_hang: the MAP to the hanging server got status ",
        status as u64
    );
    check(status != OK, "the MAP to a hanging server succeeded")?;
    check(
        v.one(Req::Attach(9, 0x7f8, 0)) == 6,
        "the virtio-iommu does not answer",
    )
}

/// Two DMA test devices behind the vIOMMU, each in its own domain, copying in turn; the first
/// one's server goes wrong mid-session (the test harness puts a misbehaving proxy in front of
/// it). The first device's operations start failing; the second keeps copying correctly, and
/// the vIOMMU keeps answering.
fn hostile_peer(c: &mut Ctx) -> Result<(), &'static str> {
    const SIZE: u64 = 8192;
    let (ep_a, ep_b) = (c.ep, c.dev2.as_ref().ok_or("no second DMA test device")?.1);
    let (sa, da, sb, db) = (
        alloc_pages(2),
        alloc_pages(2),
        alloc_pages(2),
        alloc_pages(2),
    );
    pattern(sa, SIZE, 1);
    pattern(sb, SIZE, 2);
    let v = viommu(c);
    for (dom, ep, s, d) in [(11, ep_a, sa, da), (12, ep_b, sb, db)] {
        check(v.one(Req::Attach(dom, ep, 0)) == OK, "ATTACH failed")?;
        check(
            v.one(Req::Map(dom, IOVA, IOVA + SIZE - 1, s, MAP_R)) == OK,
            "MAP of a source failed",
        )?;
        check(
            v.one(Req::Map(dom, IOVA + SIZE, IOVA + 2 * SIZE - 1, d, MAP_W)) == OK,
            "MAP of a destination failed",
        )?;
    }
    let mut a_failed_at = None;
    let mut b_after = 0u32;
    for i in 0..2000u32 {
        if a_failed_at.is_none() {
            fill(da, SIZE, 0);
            let out = dev(c).run(dmadev::OP_COPY, IOVA, IOVA + SIZE, SIZE, 0);
            if out.status != dmadev::DONE || bytes(da, SIZE) != bytes(sa, SIZE) {
                a_failed_at = Some(i);
            }
        }
        fill(db, SIZE, 0);
        let b = &c.dev2.as_ref().ok_or("no second device")?.0;
        let out = b.run(dmadev::OP_COPY, IOVA, IOVA + SIZE, SIZE, 0);
        check(
            out.status == dmadev::DONE,
            "the healthy device's copy failed",
        )?;
        check(
            bytes(db, SIZE) == bytes(sb, SIZE),
            "the healthy device copied wrong bytes",
        )?;
        if a_failed_at.is_some() {
            b_after += 1;
            if b_after == 20 {
                break;
            }
        }
    }
    let at = a_failed_at.ok_or("the first device never failed")?;
    say!(
        "# hostile_peer: the first device failed at copy ",
        at,
        "; the second did ",
        b_after,
        " good copies after that"
    );
    check(at > 0, "the first device failed before any copy")?;
    check(b_after == 20, "the second device stopped")?;
    let st = viommu(c).one(Req::Attach(9, 0x7f8, 0));
    check(st == 6, "the virtio-iommu does not answer")
}

/// Two endpoints in one domain (5.13.6.1: "Multiple endpoints can be attached to the same
/// domain"): both devices reach the same mappings. The first fills a buffer through the
/// shared IOVA, the second copies it through the same IOVA to another shared mapping; an
/// UNMAP takes the mapping from both; DETACH of one leaves the other working in the domain.
fn shared_domain(c: &mut Ctx) -> Result<(), &'static str> {
    const SIZE: u64 = 16384;
    let ep_b = c.dev2.as_ref().ok_or("no second DMA test device")?.1;
    let (ep_a, dom) = (c.ep, 13);
    let (src, dst) = (alloc_pages(4), alloc_pages(4));
    fill(src, SIZE, 0);
    fill(dst, SIZE, 0);
    let v = viommu(c);
    check(
        v.one(Req::Attach(dom, ep_a, 0)) == OK,
        "ATTACH of the first failed",
    )?;
    check(
        v.one(Req::Attach(dom, ep_b, 0)) == OK,
        "ATTACH of the second failed",
    )?;
    check(
        v.one(Req::Map(dom, IOVA, IOVA + SIZE - 1, src, MAP_R | MAP_W)) == OK,
        "MAP of the source failed",
    )?;
    check(
        v.one(Req::Map(dom, IOVA + SIZE, IOVA + 2 * SIZE - 1, dst, MAP_W)) == OK,
        "MAP of the destination failed",
    )?;
    let out = dev(c).run(dmadev::OP_FILL, 0, IOVA, SIZE, 0x3c);
    check(
        out.status == dmadev::DONE && all_eq(src, SIZE, 0x3c),
        "fill through the domain",
    )?;
    fn b(c: &Ctx) -> &DmaDev {
        &c.dev2.as_ref().expect("checked above").0
    }
    let out = b(c).run(dmadev::OP_COPY, IOVA, IOVA + SIZE, SIZE, 0);
    check(
        out.status == dmadev::DONE && all_eq(dst, SIZE, 0x3c),
        "the second device did not see the first one's mapping",
    )?;
    // UNMAP takes the source from both devices.
    check(
        viommu(c).one(Req::Unmap(dom, IOVA, IOVA + SIZE - 1)) == OK,
        "UNMAP failed",
    )?;
    check(
        b(c).run(dmadev::OP_COPY, IOVA, IOVA + SIZE, SIZE, 0).status != dmadev::DONE,
        "the second device still reaches an unmapped IOVA",
    )?;
    check(
        dev(c).run(dmadev::OP_FILL, 0, IOVA, SIZE, 1).status != dmadev::DONE,
        "the first device still reaches an unmapped IOVA",
    )?;
    // The first leaves the domain; the second keeps its mappings.
    check(
        viommu(c).one(Req::Detach(dom, ep_a)) == OK,
        "DETACH of the first failed",
    )?;
    let out = b(c).run(dmadev::OP_FILL, 0, IOVA + SIZE, SIZE, 0x5d);
    check(
        out.status == dmadev::DONE && all_eq(dst, SIZE, 0x5d),
        "the second device lost the domain's mapping",
    )?;
    check(
        dev(c).run(dmadev::OP_FILL, 0, IOVA + SIZE, SIZE, 1).status != dmadev::DONE,
        "the detached device still reaches the domain",
    )?;
    check(
        viommu(c).one(Req::Detach(dom, ep_b)) == OK,
        "DETACH of the second failed",
    )
}
