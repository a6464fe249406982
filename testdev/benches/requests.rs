//! The VMM's cost per virtio-iommu request, measured where the VMM spends it: MAP+UNMAP
//! pairs laid out in guest memory as a driver would, then handed to the device's queue
//! handler by a notification (`queue_notify`), in batches of 1, 16 and 256 requests. Only
//! the handler is timed (building the chains is the guest's work).
//!
//! Backends: the in-process recording backend (the mapping core and the device model
//! alone), the vfio-user backend talking to a real `dma-test-device` process with merged
//! host maps, and the same with merging off (one DMA_MAP per guest MAP). For the vfio-user
//! round trip, one DMA_MAP+DMA_UNMAP pair is timed against a bare Unix-socket ping-pong of the
//! same message sizes measured in the same run.
//!
//! Prints requests per second of the handler's thread (one core) and the ratios; targets:
//! at least 1,000,000 requests/s in process, a vfio-user round trip within 2x the bare
//! ping-pong.
#![allow(missing_docs)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::passthrough::vfio_user_backend::VfioUserDevice;
use devices::passthrough::vfio_user_backend::{SharedRam, VfioUserDma};
use devices::virtio::iommu::{IommuHandle, VirtioIommu};
use devices::virtio::testing::{CountingInterrupt, TestQueue};
use devices::virtio::VirtioDevice;
use devices::GuestMemoryMmap;
use iommu::backend::RecordingBackend;
use iommu::protocol::{VIRTIO_IOMMU_MAP_F_READ, VIRTIO_IOMMU_MAP_F_WRITE};
use iommu::testing::{attach, map, unmap};
use iommu::{BackendCaps, DmaBackend, Viommu, ViommuConfig};
use vm_memory::{Bytes, GuestAddress};

const MEM: usize = 64 << 20;
const RW: u32 = VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE;
/// Where request buffers start.
const BUFS: u64 = 0x10_0000;
/// Requests timed per configuration (at least).
const REQUESTS: u64 = 200_000;

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer for clock_gettime.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Guest memory backed by an unlinked file, shareable with a device process.
fn shared_memory() -> (Arc<GuestMemoryMmap>, SharedRam) {
    let p = std::env::temp_dir().join(format!("vmm-bench-mem-{}", std::process::id()));
    let f = std::fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .expect("memory file");
    std::fs::remove_file(&p).expect("unlink");
    f.set_len(MEM as u64).expect("size");
    let fo = vm_memory::FileOffset::new(f.try_clone().expect("clone"), 0);
    let mem = Arc::new(
        GuestMemoryMmap::from_ranges_with_files(&[(GuestAddress(0), MEM, Some(fo))])
            .expect("memory"),
    );
    let ram = SharedRam {
        memfd: Arc::new(f),
        ranges: vec![(0, MEM as u64, 0)],
    };
    (mem, ram)
}

/// A `dma-test-device` process, killed on drop.
struct Device {
    child: Child,
    socket: PathBuf,
}

impl Device {
    fn start() -> Device {
        let socket = std::env::temp_dir().join(format!("vmm-bench-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&socket);
        let child = Command::new(env!("CARGO_BIN_EXE_dma-test-device"))
            .arg("--socket")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dma-test-device");
        let start = Instant::now();
        while !socket.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no device socket"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Device { child, socket }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// The vfio-user DMA backend of a fresh device process; `merge` as the caps say, or off.
fn vfio_user(ram: &SharedRam, merge: bool) -> (Device, Box<dyn DmaBackend>) {
    let d = Device::start();
    let dev = VfioUserDevice::connect(&d.socket).expect("connect");
    let mut dma = VfioUserDma::new(dev, ram.clone());
    if !merge {
        dma = dma.without_merging();
    }
    (d, Box::new(dma))
}

/// Runs MAP/UNMAP batches of `batch` requests through the queue handler until at least
/// [`REQUESTS`] were handled; returns requests per second of the handler's thread CPU time
/// and of wall time.
fn run(mem: &Arc<GuestMemoryMmap>, backend: Box<dyn DmaBackend>, batch: u64) -> (f64, f64) {
    let mut state = Viommu::new(ViommuConfig {
        guest_ram: vec![(0, MEM as u64)],
        ..Default::default()
    });
    let b = state.add_backend(backend).expect("backend");
    state.add_endpoint(8, Some(b), &[]).expect("endpoint");
    let handle = IommuHandle::new(state).expect("handle");
    let mut dev = VirtioIommu::new(handle, mem.clone());
    let mut req = TestQueue::new(mem, 0x1000, 512);
    let evt = TestQueue::new(mem, req.end().next_multiple_of(0x1000), 8);
    dev.set_acked_features(dev.avail_features());
    dev.activate(vec![req.queue(), evt.queue()], CountingInterrupt::new())
        .expect("activate");
    // Request bodies: written once, chains re-added every batch.
    let mut bodies = Vec::new();
    let mut at = BUFS;
    let mut put = |bytes: Vec<u8>| {
        mem.write_slice(&bytes, GuestAddress(at)).expect("write");
        let r = (at, bytes.len() as u32);
        at += 128;
        r
    };
    let a = put(attach(1, 8, 0));
    let mut maps = Vec::new();
    let mut unmaps = Vec::new();
    for i in 0..batch {
        let iova = 0x1000_0000 + i * 0x1000;
        maps.push(put(map(1, iova, iova + 0xfff, 0x20_0000 + i * 0x1000, RW)));
        unmaps.push(put(unmap(1, iova, iova + 0xfff)));
    }
    bodies.push(a);
    let tail = at;
    let submit = |req: &mut TestQueue, bufs: &[(u64, u32)]| {
        for &(addr, len) in bufs {
            req.add(mem, &[(addr, len, false), (tail, 4, true)]);
        }
    };
    submit(&mut req, &bodies);
    dev.queue_notify(0);
    assert_eq!(req.used(mem).len(), 1);
    let (mut cpu, mut wall, mut done) = (Duration::ZERO, Duration::ZERO, 0u64);
    while done < REQUESTS {
        for part in [&maps, &unmaps] {
            submit(&mut req, part);
            let (c0, w0) = (thread_cpu(), Instant::now());
            dev.queue_notify(0);
            cpu += thread_cpu() - c0;
            wall += w0.elapsed();
            let used = req.used(mem);
            assert_eq!(used.len() as u64, batch);
            let status: u8 = mem.read_obj(GuestAddress(tail)).expect("status");
            assert_eq!(status, 0, "requests succeed");
            done += batch;
        }
    }
    (
        done as f64 / cpu.as_secs_f64(),
        done as f64 / wall.as_secs_f64(),
    )
}

/// Round trip of a bare Unix-socket ping-pong with vfio-user's message sizes (a DMA_MAP
/// request of 16 + 32 bytes and its 16-byte header reply), in microseconds.
fn ping_pong() -> f64 {
    let (mut a, mut b) = UnixStream::pair().expect("socketpair");
    let echo = std::thread::spawn(move || {
        let mut req = [0u8; 48];
        while b.read_exact(&mut req).is_ok() {
            if b.write_all(&req[..16]).is_err() {
                break;
            }
        }
    });
    let n = 20_000;
    let (req, mut rep) = ([1u8; 48], [0u8; 16]);
    let t = Instant::now();
    for _ in 0..n {
        a.write_all(&req).expect("ping");
        a.read_exact(&mut rep).expect("pong");
    }
    let us = t.elapsed().as_secs_f64() * 1e6 / f64::from(n);
    drop(a);
    let _ = echo.join();
    us
}

/// One DMA_MAP (and one DMA_UNMAP) round trip to a device process, in microseconds.
fn vfio_user_round_trip(ram: &SharedRam) -> f64 {
    let (_d, mut dma) = vfio_user(ram, false);
    let n = 10_000u64;
    let t = Instant::now();
    for i in 0..n {
        let iova = 0x4000_0000 + (i % 64) * 0x1000;
        dma.map(iova, 0x20_0000, 0x1000, iommu::Perm::RW)
            .expect("map");
        dma.unmap(iova, 0x1000).expect("unmap");
    }
    t.elapsed().as_secs_f64() * 1e6 / (2 * n) as f64
}

fn main() {
    // `cargo bench` passes `--bench`; filters are not supported (the run is short).
    let (mem, ram) = shared_memory();
    println!("virtio-iommu requests through the queue handler (MAP+UNMAP pairs)");
    println!(
        "{:<28} {:>6} {:>16} {:>16}",
        "backend", "batch", "req/s per core", "req/s wall"
    );
    let mut in_process = Vec::new();
    for batch in [1u64, 16, 256] {
        let (rec, _) = RecordingBackend::new("recording", BackendCaps::default());
        let (c, w) = run(&mem, Box::new(rec), batch);
        in_process.push(c);
        println!(
            "{:<28} {batch:>6} {c:>16.0} {w:>16.0}",
            "recording (in process)"
        );
    }
    for (name, merge) in [
        ("vfio-user, merged maps", true),
        ("vfio-user, one map per MAP", false),
    ] {
        for batch in [1u64, 16, 256] {
            let (_d, b) = vfio_user(&ram, merge);
            let (c, w) = run(&mem, b, batch);
            println!("{name:<28} {batch:>6} {c:>16.0} {w:>16.0}");
        }
    }
    let pp = ping_pong();
    let rt = vfio_user_round_trip(&ram);
    println!(
        "vfio-user DMA_MAP/UNMAP round trip {rt:.1} us; bare Unix-socket ping-pong {pp:.1} us; \
         ratio {:.2} (target <= 2)",
        rt / pp
    );
    let best = in_process.iter().cloned().fold(0.0, f64::max);
    println!(
        "in process: best {best:.0} requests/s per core ({:.2}x the 1,000,000 target)",
        best / 1e6
    );
}
